/* Direct mode: public socket <-> target socket.
 *
 * Both sockets are relayed with splice(2) through a pipe, so payload bytes never enter
 * user space: two syscalls per chunk, no copies, no evbuffer memory.
 *
 * An IP target is dialled with a plain non-blocking connect() and the relay starts at
 * once: the connection is known to be up when a byte moves to or from the target (or,
 * when none has, by asking the socket), so a Connection: close request costs no extra
 * epoll registration, getsockopt or getpeername for the dial -- on a loopback wrk run it
 * was 25 syscalls per connection with a dialer bufferevent. A host-name target is resolved
 * with evdns first and then dialled the same way, so that the address is known before the
 * connect: a name that resolves to this server itself on one of its ports is a forwarding
 * loop, refused before it can accept its own connection (SPEC §2). Backpressure is the
 * pipe itself: when the
 * destination cannot take more, reading from the source stops until the destination is
 * writable again, so at most RELAY_PIPE_SIZE bytes per direction wait, in the kernel.
 *
 * Half-close as OpenSSH's nchan.c does it: each direction has its own state; a FIN from one
 * side becomes shutdown(SHUT_WR) on the other once the pipe drained, and the pair is freed
 * when both directions are done, or at once on an error. Pipes come from a small pool and
 * go back to it whenever they are empty, so an idle connection holds none. */
#include "forward.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/event.h>

#include "config.h"
#include "log.h"
#include "loop_guard.h"
#include "mapping.h"
#include "mapping_dial.h"
#include "netaddr.h"
#include "proxy_header.h"
#include "server.h"
#include "token_bucket.h"

/* Bytes one direction may hold in flight (in its pipe) before reading pauses. */
#define RELAY_PIPE_SIZE (256 * 1024)
/* Empty pipes kept for reuse; more are closed. */
#define RELAY_POOL_MAX 64
/* A rate-limited direction waits for at least this many tokens (or the bucket's whole
 * capacity when smaller) before its next splice, so it moves few large chunks... */
#define RELAY_RL_CHUNK (16 * 1024)
/* ... but wakes at least this often, so a rate raised by an update applies at once. */
#define RELAY_RL_MAX_WAIT_NS (100 * 1000 * 1000ull)
/* A refused forwarding loop is logged at most once per this many seconds: every
 * connection to such a mapping hits it. */
#define FORWARD_LOOP_LOG_SECONDS 10

struct relay_pipe {
    int rd, wr;
};

/* The loop is single-threaded, so one pool per process needs no lock. */
static struct relay_pipe relay_pool[RELAY_POOL_MAX];
static int relay_pool_len;
static int relay_pipe_size = RELAY_PIPE_SIZE;
static time_t loop_logged;
static unsigned long loop_suppressed;

struct relay_dir {
    struct relay_pipe pipe;  /* rd == -1 when none is held */
    size_t in_pipe;          /* bytes read from the source, not yet written */
    bool eof;                /* the source sent FIN */
    bool shut;               /* the FIN was passed on to the destination */
    bool throttled;          /* rate_limit: no tokens; rl_timer resumes reading */
    struct event *rl_timer;  /* created on the first throttle */
};

/* fd[0] is the public side, fd[1] the target; dir[i] carries bytes read from fd[i]. */
struct forward_conn {
    struct mapping_conn mc;      /* first: mapping removal aborts through it */
    struct evdns_getaddrinfo_request *resolving; /* host-name target, while resolving */
    bool zombie;                 /* freed while resolving: the resolver's callback frees */
    struct event *connect_timer; /* until the target is known to be connected */
    bool connected;              /* fd[1] reached the target */
    int fd[2];
    struct event *ev_read[2];
    struct event *ev_write[2];
    struct relay_dir dir[2];
    /* PROXY protocol header, sent to the target before any relayed byte. */
    unsigned char pp[PROXY_HEADER_MAX];
    size_t pp_len, pp_sent;
};

static int relay_pipe_get(struct relay_pipe *p)
{
    if (relay_pool_len > 0) {
        *p = relay_pool[--relay_pool_len];
        return 0;
    }
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
        return -1;
    /* A bigger pipe moves more per splice; without the privilege to grow it, 64 KiB works. */
    if (relay_pipe_size > 0 && fcntl(fds[1], F_SETPIPE_SZ, relay_pipe_size) < 0)
        relay_pipe_size = 0;
    p->rd = fds[0];
    p->wr = fds[1];
    return 0;
}

/* Returns an empty pipe to the pool; a pipe still holding bytes is closed. */
static void relay_pipe_put(struct relay_pipe *p, bool empty)
{
    if (p->rd < 0)
        return;
    if (empty && relay_pool_len < RELAY_POOL_MAX) {
        relay_pool[relay_pool_len++] = *p;
    } else {
        close(p->rd);
        close(p->wr);
    }
    p->rd = p->wr = -1;
}

static void forward_mark_connected(struct forward_conn *fc)
{
    fc->connected = true;
    if (fc->connect_timer) {
        event_free(fc->connect_timer);
        fc->connect_timer = NULL;
    }
}

/* Whether fd[1] reached the target when no byte has told us yet: 1 connected, 0 still
 * connecting, -1 failed (errno says why). Asks the socket: rare, off the hot path. */
static int forward_target_state(struct forward_conn *fc)
{
    if (fc->connected)
        return 1;
    if (fc->fd[1] < 0)
        return 0;
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fc->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -1;
    if (err) {
        errno = err;
        return -1;
    }
    struct sockaddr_storage peer;
    len = sizeof(peer);
    if (getpeername(fc->fd[1], (struct sockaddr *)&peer, &len) == 0) {
        forward_mark_connected(fc);
        return 1;
    }
    return errno == ENOTCONN ? 0 : -1;
}

static void forward_log_dial_failure(struct forward_conn *fc, const char *why)
{
    struct mapping *m = fc->mc.mapping;
    mapping_dial_failed(m, "connect to %.64s:%d failed: %s", mapping_target_host(m),
                        m->rec.target_port, why);
}

static void forward_free(struct forward_conn *fc, bool failed)
{
    mapping_conn_end(&fc->mc, failed);
    if (fc->connect_timer)
        event_free(fc->connect_timer);
    for (int i = 0; i < 2; i++) {
        if (fc->ev_read[i])
            event_free(fc->ev_read[i]);
        if (fc->ev_write[i])
            event_free(fc->ev_write[i]);
        if (fc->dir[i].rl_timer)
            event_free(fc->dir[i].rl_timer);
        relay_pipe_put(&fc->dir[i].pipe, fc->dir[i].in_pipe == 0);
        if (fc->fd[i] >= 0)
            close(fc->fd[i]);
    }
    if (fc->resolving) {
        /* The resolver calls back once more (cancelled); that call frees fc. */
        struct evdns_getaddrinfo_request *req = fc->resolving;
        fc->resolving = NULL;
        fc->zombie = true;
        evdns_getaddrinfo_cancel(req);
        return;
    }
    free(fc);
}

/* The target is this server itself: refused before any connect, counted as failed. */
static void forward_refuse_loop(struct forward_conn *fc, const char *target)
{
    struct mapping *m = fc->mc.mapping;
    time_t now = time(NULL);
    if (now - loop_logged >= FORWARD_LOOP_LOG_SECONDS || now < loop_logged) {
        log_warn("forward", "port %d: target %.64s:%d is this server itself (a forwarding "
                            "loop); connection refused (%lu more since the last such line)",
                 m->rec.port, target, m->rec.target_port, loop_suppressed);
        loop_logged = now;
        loop_suppressed = 0;
    } else {
        loop_suppressed++;
    }
    forward_free(fc, true);
}

static void forward_abort(struct mapping_conn *mc)
{
    struct forward_conn *fc = (struct forward_conn *)mc;
    forward_free(fc, forward_target_state(fc) != 1);
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static uint64_t relay_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* What of room the mapping's rate_limit lets direction d read now: an equal share of the
 * bucket per live connection, so the connections of one mapping take turns fairly. Sets
 * dir->throttled when nothing may be read. */
static size_t relay_rate_room(struct forward_conn *fc, int d, size_t room)
{
    struct mapping *m = fc->mc.mapping;
    struct token_bucket *tb = &m->bucket[d];
    if (!tb->rate) {
        fc->dir[d].throttled = false; /* the limit may have just been lifted */
        return room;
    }
    uint64_t share = tb->capacity / (m->stats.active ? m->stats.active : 1);
    if (share < 1)
        share = 1;
    uint64_t allowed = token_bucket_available(tb, room < share ? room : share, relay_now_ns());
    fc->dir[d].throttled = allowed == 0;
    return (size_t)allowed;
}

/* Reads what fd[d] has into the pipe. Returns bytes read, 0 when nothing is to be had now
 * (EAGAIN, EOF, pipe full, no rate tokens), -1 on error. */
static ssize_t relay_fill(struct forward_conn *fc, int d)
{
    struct relay_dir *dir = &fc->dir[d];
    size_t room = (size_t)(relay_pipe_size ? relay_pipe_size : 65536) - dir->in_pipe;
    if (dir->eof || room == 0)
        return 0;
    if ((room = relay_rate_room(fc, d, room)) == 0)
        return 0;
    if (dir->pipe.rd < 0 && relay_pipe_get(&dir->pipe) < 0)
        return -1;
    ssize_t n = splice(fc->fd[d], NULL, dir->pipe.wr, NULL, room,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (d == 1 && n >= 0 && !fc->connected)
        forward_mark_connected(fc);  /* bytes or a FIN from the target */
    if (n > 0) {
        dir->in_pipe += (size_t)n;
        token_bucket_take(&fc->mc.mapping->bucket[d], (uint64_t)n);
        mapping_conn_add_bytes(&fc->mc, d == 0 ? (uint64_t)n : 0, d == 0 ? 0 : (uint64_t)n);
        return n;
    }
    if (n == 0) {
        dir->eof = true;
        return 0;
    }
    return errno == EAGAIN ? 0 : -1;
}

/* Sends (the rest of) the PROXY protocol header to the target. Returns 1 when it is all
 * out, 0 when the target cannot take it yet (writability resumes direction 0), -1 on an
 * error. */
static int relay_send_header(struct forward_conn *fc)
{
    while (fc->pp_sent < fc->pp_len) {
        ssize_t n = send(fc->fd[1], fc->pp + fc->pp_sent, fc->pp_len - fc->pp_sent,
                         MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == ENOTCONN)) {
            event_add(fc->ev_write[1], NULL);
            return 0;
        }
        if (n <= 0)
            return -1;
        fc->pp_sent += (size_t)n;
    }
    if (!fc->connected)
        forward_mark_connected(fc);
    return 1;
}

/* Writes what the pipe holds to the other side. Returns bytes written, 0 when the
 * destination is full, -1 on error. */
static ssize_t relay_drain(struct forward_conn *fc, int d)
{
    struct relay_dir *dir = &fc->dir[d];
    if (dir->in_pipe == 0)
        return 0;
    if (d == 0 && fc->pp_sent < fc->pp_len)
        return 0; /* the header goes first; relay_send_header resumes us */
    ssize_t n = splice(dir->pipe.rd, NULL, fc->fd[!d], NULL, dir->in_pipe,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n > 0) {
        if (d == 0 && !fc->connected)
            forward_mark_connected(fc);
        dir->in_pipe -= (size_t)n;
        return n;
    }
    return n < 0 && errno == EAGAIN ? 0 : -1;
}

/* Passes direction d's FIN on to the other side. Returns 1 done, 0 to wait (the target is
 * still connecting: a shutdown now would abort the connect, so wait until it is writable),
 * -1 when the connection must close. */
static int relay_pass_fin(struct forward_conn *fc, int d)
{
    if (d == 0 && fc->pp_sent < fc->pp_len) {
        event_add(fc->ev_write[1], NULL);
        return 0;
    }
    if (d == 0) {
        int state = forward_target_state(fc);
        if (state <= 0) {
            if (state == 0)
                event_add(fc->ev_write[1], NULL);
            return state;
        }
    }
    /* When the other direction is finished too, the close that follows sends this FIN. */
    if (!fc->dir[!d].shut)
        shutdown(fc->fd[!d], SHUT_WR);
    fc->dir[d].shut = true;
    return 1;
}

static void relay_step(struct forward_conn *fc, int d);

/* The bucket has tokens again: resume the direction that waited for them. */
static void relay_rl_resume(struct forward_conn *fc, int d)
{
    fc->dir[d].throttled = false;
    relay_step(fc, d);
}

static void relay_rl_timer0_cb(evutil_socket_t fd, short what, void *arg)
{
    relay_rl_resume(arg, 0);
}

static void relay_rl_timer1_cb(evutil_socket_t fd, short what, void *arg)
{
    relay_rl_resume(arg, 1);
}

/* Out of rate tokens: stop reading direction d until the bucket holds a chunk again. */
static int relay_throttle(struct forward_conn *fc, int d)
{
    struct relay_dir *dir = &fc->dir[d];
    event_del(fc->ev_read[d]);
    if (!dir->rl_timer) {
        dir->rl_timer = evtimer_new(fc->mc.mapping->srv->base,
                                    d == 0 ? relay_rl_timer0_cb : relay_rl_timer1_cb, fc);
        if (!dir->rl_timer)
            return -1;
    }
    uint64_t ns = token_bucket_wait_ns(&fc->mc.mapping->bucket[d], RELAY_RL_CHUNK);
    if (ns < 1000000)
        ns = 1000000;
    if (ns > RELAY_RL_MAX_WAIT_NS)
        ns = RELAY_RL_MAX_WAIT_NS;
    struct timeval tv = {(time_t)(ns / 1000000000ull), (suseconds_t)(ns % 1000000000ull / 1000)};
    return evtimer_add(dir->rl_timer, &tv) < 0 ? -1 : 0;
}

/* Moves bytes of direction d until the source is dry or the destination is full, then
 * arms the events that will resume it. Returns -1 when the connection must close. */
static int relay_pump(struct forward_conn *fc, int d)
{
    struct relay_dir *dir = &fc->dir[d];
    ssize_t in, out;
    bool more;
    if (d == 0 && fc->pp_sent < fc->pp_len && relay_send_header(fc) < 0)
        return -1;
    do {
        size_t before = dir->in_pipe;
        if ((in = relay_fill(fc, d)) < 0 || (out = relay_drain(fc, d)) < 0)
            return -1;
        /* A read that did not fill the pipe took what was there: the next byte or FIN
         * comes with the next readiness, not with another splice now. */
        more = in > 0 && before + (size_t)in ==
                             (size_t)(relay_pipe_size ? relay_pipe_size : 65536);
    } while (more && (out > 0 || dir->in_pipe == 0));
    if (dir->in_pipe > 0) {
        /* Destination full: wait for it, and stop reading so the pipe stays bounded. */
        event_del(fc->ev_read[d]);
        event_add(fc->ev_write[!d], NULL);
        return 0;
    }
    relay_pipe_put(&dir->pipe, true);
    if (dir->throttled && !dir->eof)
        return relay_throttle(fc, d);
    if (!dir->eof) {
        event_add(fc->ev_read[d], NULL);
        return 0;
    }
    event_del(fc->ev_read[d]);
    return dir->shut ? 0 : relay_pass_fin(fc, d) < 0 ? -1 : 0;
}

static void relay_step(struct forward_conn *fc, int d)
{
    if (relay_pump(fc, d) < 0) {
        /* A reset or write error ends both directions; before the target was reached, it
         * is the dial that failed. */
        int err = errno;
        bool failed = forward_target_state(fc) != 1;
        if (failed)
            forward_log_dial_failure(fc, strerror(err));
        forward_free(fc, failed);
        return;
    }
    if (fc->dir[0].shut && fc->dir[1].shut)
        forward_free(fc, false);
}

static void relay_readable_cb(evutil_socket_t fd, short what, void *arg)
{
    struct forward_conn *fc = arg;
    relay_step(fc, fd == fc->fd[0] ? 0 : 1);
}

/* fd became writable: resume the direction that writes into it. */
static void relay_writable_cb(evutil_socket_t fd, short what, void *arg)
{
    struct forward_conn *fc = arg;
    relay_step(fc, fd == fc->fd[0] ? 1 : 0);
}

static int relay_start(struct forward_conn *fc)
{
    struct event_base *base = fc->mc.mapping->srv->base;
    for (int i = 0; i < 2; i++) {
        fc->ev_read[i] = event_new(base, fc->fd[i], EV_READ | EV_PERSIST, relay_readable_cb, fc);
        fc->ev_write[i] = event_new(base, fc->fd[i], EV_WRITE, relay_writable_cb, fc);
        if (!fc->ev_read[i] || !fc->ev_write[i])
            return -1;
        event_add(fc->ev_read[i], NULL);
    }
    /* The header goes as soon as the target takes it, whether or not the client speaks
     * first (a PROXY-protocol target waits for it before it says anything). */
    if (fc->pp_len > 0)
        event_add(fc->ev_write[1], NULL);
    return 0;
}

/* No byte has moved within the connect timeout: fine if the target is there but silent,
 * a failure if the connect is still pending. */
static void forward_connect_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct forward_conn *fc = arg;
    int state = forward_target_state(fc);
    if (state == 1)
        return;
    forward_log_dial_failure(fc, state == 0 ? "timed out" : strerror(errno));
    forward_free(fc, true);
}

/* Arms the connect timeout (once: a host name's started while it was resolved). */
static int forward_arm_timeout(struct forward_conn *fc, const struct timeval *timeout)
{
    if (fc->connect_timer)
        return 0;
    fc->connect_timer = evtimer_new(fc->mc.mapping->srv->base, forward_connect_timeout_cb, fc);
    return fc->connect_timer && evtimer_add(fc->connect_timer, timeout) == 0 ? 0 : -1;
}

static int forward_dial_ip(struct forward_conn *fc, const struct sockaddr *sa, socklen_t len,
                           const struct timeval *timeout)
{
    fc->fd[1] = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fc->fd[1] < 0)
        return -1;
    set_nodelay(fc->fd[1]);
    if (connect(fc->fd[1], sa, len) == 0)
        forward_mark_connected(fc);
    else if (errno != EINPROGRESS || forward_arm_timeout(fc, timeout) < 0)
        return -1;
    return relay_start(fc);
}

static void forward_resolved_cb(int err, struct evutil_addrinfo *res, void *arg)
{
    struct forward_conn *fc = arg;
    if (fc->zombie) {
        if (res)
            evutil_freeaddrinfo(res);
        free(fc);
        return;
    }
    fc->resolving = NULL;
    struct mapping *m = fc->mc.mapping;
    if (err != 0 || !res) {
        forward_log_dial_failure(fc, err ? evutil_gai_strerror(err) : "no address");
        if (res)
            evutil_freeaddrinfo(res);
        forward_free(fc, true);
        return;
    }
    /* Checked on the address we are about to connect to: a name may resolve to this
     * server only now, long after the mapping was created. */
    if (loop_guard_targets_self(m->srv, res->ai_addr, 0)) {
        evutil_freeaddrinfo(res);
        forward_refuse_loop(fc, mapping_target_host(m));
        return;
    }
    struct timeval timeout = {m->srv->cfg->connect_timeout, 0};
    int rc = forward_dial_ip(fc, res->ai_addr, (socklen_t)res->ai_addrlen, &timeout);
    int saved = errno;
    evutil_freeaddrinfo(res);
    if (rc < 0) {
        forward_log_dial_failure(fc, strerror(saved));
        forward_free(fc, true);
    }
}

/* Resolves, then dials the first address, like bufferevent_socket_connect_hostname. The
 * timeout covers the resolution too. Returns -1 only when nothing was started; after
 * that fc may already be gone (an answer from /etc/hosts comes back at once). */
static int forward_dial_hostname(struct forward_conn *fc, const struct timeval *timeout)
{
    struct mapping *m = fc->mc.mapping;
    if (forward_arm_timeout(fc, timeout) < 0)
        return -1;
    char port[8];
    snprintf(port, sizeof(port), "%d", m->rec.target_port);
    struct evutil_addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    struct evdns_getaddrinfo_request *req = evdns_getaddrinfo(
        m->srv->dns, mapping_target_host(m), port, &hints, forward_resolved_cb, fc);
    if (req)
        fc->resolving = req; /* still pending: fc is alive */
    return 0;
}

void forward_start(struct mapping *m, evutil_socket_t fd)
{
    struct forward_conn *fc = calloc(1, sizeof(*fc));
    if (!fc) {
        close(fd);
        return;
    }
    fc->fd[0] = fd;  /* accepted non-blocking by evconnlistener */
    fc->fd[1] = -1;
    for (int i = 0; i < 2; i++)
        fc->dir[i].pipe.rd = fc->dir[i].pipe.wr = -1;
    mapping_conn_begin(m, &fc->mc, forward_abort);
    fc->pp_len = (size_t)mapping_conn_proxy_header(&fc->mc, fd, fc->pp);
    set_nodelay(fd);
    /* A target that never answers fails after tunnel.connect_timeout rather than the
     * kernel's two minutes. */
    struct timeval timeout = {m->srv->cfg->connect_timeout, 0};
    struct sockaddr_storage target;
    socklen_t len;
    const char *host = mapping_target_host(m);
    bool literal = netaddr_ip_sockaddr(host, (uint16_t)m->rec.target_port, &target, &len) == 0;
    /* A mapping stored before loops were refused at create, or one whose name now means
     * this host, must not connect to ourselves (SPEC §2). */
    if (literal ? loop_guard_targets_self(m->srv, (struct sockaddr *)&target, 0)
                : loop_guard_is_server_port(m->srv, m->rec.target_port, 0) &&
                      loop_guard_is_self_name(host)) {
        forward_refuse_loop(fc, host);
        return;
    }
    int rc = literal ? forward_dial_ip(fc, (struct sockaddr *)&target, len, &timeout)
                     : forward_dial_hostname(fc, &timeout);
    if (rc < 0) {
        /* Refused before starting (no callback ran). */
        forward_log_dial_failure(fc, strerror(errno));
        forward_free(fc, true);
    }
}

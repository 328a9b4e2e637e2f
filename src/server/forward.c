/* Direct mode: public socket <-> target socket. This file dials; the bytes move in
 * splice_relay.c.
 *
 * An IP target is dialled with a plain non-blocking connect() and the relay starts at
 * once: the relay knows the connection is up when a byte moves to or from the target (or,
 * when none has, by asking the socket), so a Connection: close request costs no extra
 * epoll registration, getsockopt or getpeername for the dial. A host-name target is
 * resolved with evdns first and then dialled the same way, so that the address is known
 * before the connect: a name that resolves to this server itself on one of its ports is a
 * forwarding loop, refused before it can accept its own connection (SPEC §2). The
 * mapping's rate_limit and byte counters are wired into the relay through its hooks. */
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
#include "log_limit.h"
#include "loop_guard.h"
#include "mapping.h"
#include "netaddr.h"
#include "proxy_header.h"
#include "splice_relay.h"
#include "server.h"
#include "token_bucket.h"

/* A rate-limited direction waits for at least this many tokens (or the bucket's whole
 * capacity when smaller) before its next splice, so it moves few large chunks. */
#define FORWARD_RL_CHUNK (16 * 1024)
/* A refused forwarding loop is logged at most once per this many seconds: every
 * connection to such a mapping hits it. */
#define FORWARD_LOOP_LOG_SECONDS 10

static struct log_limit loop_log;

struct forward_conn {
    struct mapping_conn mc;      /* first: mapping removal aborts through it */
    struct evdns_getaddrinfo_request *resolving; /* host-name target, while resolving */
    bool zombie;                 /* freed while resolving: the resolver's callback frees */
    /* Until the target is known to be connected. It lives in this allocation's tail
     * (event_assign, sized by event_get_struct_event_size): nothing else is allocated
     * per connection but the relay. */
    struct event *connect_timer;
    bool timer_armed;
    int fd;                      /* the public socket, until the relay takes it */
    struct splice_relay *relay;  /* once dialled: owns both sockets */
    /* PROXY protocol header, handed to the relay to send before any relayed byte. */
    unsigned char pp[PROXY_HEADER_MAX];
    size_t pp_len;
};

/* The target is connected: the connect timeout has nothing left to watch. */
static void forward_connected(void *arg)
{
    struct forward_conn *fc = arg;
    if (fc->timer_armed) {
        evtimer_del(fc->connect_timer);
        fc->timer_armed = false;
    }
}

/* 1 connected, 0 still connecting (or resolving), -1 failed (errno says why). */
static int forward_target_state(struct forward_conn *fc)
{
    return fc->relay ? splice_relay_target_state(fc->relay) : 0;
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
    forward_connected(fc); /* disarms the timer */
    splice_relay_free(fc->relay);
    if (fc->fd >= 0)
        close(fc->fd);
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
    unsigned long held;
    if (log_limit_take(&loop_log, time(NULL), FORWARD_LOOP_LOG_SECONDS, &held))
        log_warn("forward", "port %d: target %.64s:%d is this server itself (a forwarding "
                            "loop); connection refused (%lu more since the last such line)",
                 m->rec.port, target, m->rec.target_port, held);
    forward_free(fc, true);
}

static void forward_abort(struct mapping_conn *mc)
{
    struct forward_conn *fc = (struct forward_conn *)mc;
    forward_free(fc, forward_target_state(fc) != 1);
}

static bool forward_unwatched_source_dead(struct mapping_conn *mc)
{
    struct forward_conn *fc = (struct forward_conn *)mc;
    return fc->relay && splice_relay_unwatched_source_dead(fc->relay);
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static uint64_t forward_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Bytes read from side d: the mapping's counters and its rate bucket. */
static void forward_on_bytes(int d, size_t n, void *arg)
{
    struct forward_conn *fc = arg;
    token_bucket_take(&fc->mc.mapping->bucket[d], (uint64_t)n);
    mapping_conn_add_bytes(&fc->mc, d == 0 ? (uint64_t)n : 0, d == 0 ? 0 : (uint64_t)n);
}

/* One connection's equal share of the mapping's bucket, so the connections of one
 * mapping take turns fairly. */
static uint64_t forward_rl_share(const struct mapping *m, const struct token_bucket *tb)
{
    uint64_t share = tb->capacity / (m->stats.active ? m->stats.active : 1);
    return share < 1 ? 1 : share;
}

/* The least a read waits for: a chunk, or the whole share when that is smaller. */
static uint64_t forward_rl_chunk(const struct mapping *m, const struct token_bucket *tb)
{
    uint64_t share = forward_rl_share(m, tb);
    return share < FORWARD_RL_CHUNK ? share : FORWARD_RL_CHUNK;
}

/* What of room the mapping's rate_limit lets direction d read now. Below a chunk's worth
 * of tokens it is nothing: the direction waits for the bucket (forward_read_wait_ns)
 * instead of reading the few hundred bytes a level-triggered wake-up finds each time,
 * which kept a core busy as soon as a limited connection moved more than ~0.3 MB/s. */
static size_t forward_read_room(int d, size_t room, void *arg)
{
    struct forward_conn *fc = arg;
    struct mapping *m = fc->mc.mapping;
    struct token_bucket *tb = &m->bucket[d];
    if (!tb->rate)
        return room; /* the limit may have just been lifted */
    uint64_t share = forward_rl_share(m, tb);
    uint64_t want = room < share ? room : share;
    uint64_t chunk = share < FORWARD_RL_CHUNK ? share : FORWARD_RL_CHUNK;
    uint64_t avail = token_bucket_available(tb, want, forward_now_ns());
    return avail < (want < chunk ? want : chunk) ? 0 : (size_t)avail;
}

static uint64_t forward_read_wait_ns(int d, void *arg)
{
    struct forward_conn *fc = arg;
    struct mapping *m = fc->mc.mapping;
    return token_bucket_wait_ns(&m->bucket[d], forward_rl_chunk(m, &m->bucket[d]));
}

/* The relay ended: both directions done, or a reset or write error; before the target
 * was reached, it is the dial that failed. */
static void forward_on_close(int err, bool reached, void *arg)
{
    struct forward_conn *fc = arg;
    fc->relay = NULL; /* freed by the relay right after */
    if (err && !reached)
        forward_log_dial_failure(fc, strerror(err));
    forward_free(fc, !reached);
}

static const struct splice_relay_hooks forward_relay_hooks = {
    .on_bytes = forward_on_bytes,
    .read_room = forward_read_room,
    .read_wait_ns = forward_read_wait_ns,
    .on_connected = forward_connected,
    .on_close = forward_on_close,
    .log_module = "forward",
};

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
    if (fc->timer_armed)
        return 0;
    if (evtimer_assign(fc->connect_timer, fc->mc.mapping->srv->base, forward_connect_timeout_cb,
                       fc) < 0 ||
        evtimer_add(fc->connect_timer, timeout) < 0)
        return -1;
    fc->timer_armed = true;
    return 0;
}

static int forward_dial_ip(struct forward_conn *fc, const struct sockaddr *sa, socklen_t len,
                           const struct timeval *timeout)
{
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    set_nodelay(fd);
    bool connected = connect(fd, sa, len) == 0;
    if (connected) {
        forward_connected(fc);
    } else if (errno != EINPROGRESS || forward_arm_timeout(fc, timeout) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    fc->relay = splice_relay_new(fc->mc.mapping->srv->base, fc->fd, fd, connected, fc->pp,
                                 fc->pp_len, &forward_relay_hooks, fc);
    fc->fd = -1; /* the relay's now, or closed */
    return fc->relay ? 0 : -1;
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
    size_t head = (sizeof(struct forward_conn) + 15) & ~(size_t)15;
    struct forward_conn *fc = calloc(1, head + event_get_struct_event_size());
    if (!fc) {
        close(fd);
        return;
    }
    fc->connect_timer = (struct event *)(void *)((unsigned char *)fc + head);
    fc->fd = fd;  /* accepted non-blocking by evconnlistener */
    mapping_conn_begin(m, &fc->mc, forward_abort);
    fc->mc.unwatched_source_dead = forward_unwatched_source_dead;
    fc->pp_len = (size_t)mapping_conn_proxy_header(&fc->mc, fd, fc->pp);
    /* TCP_NODELAY comes with the accept, from the mapping's listener. */
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

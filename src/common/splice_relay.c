/* Socket <-> socket relay on pipes; see splice_relay.h. */
#include "splice_relay.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "fd_limit.h"
#include "relay_dir.h"

/* Bytes one direction may hold in flight (in its pipe) before reading pauses. */
#define SPLICE_RELAY_PIPE_SIZE (256 * 1024)
/* Empty pipes kept for reuse; more are closed. */
#define SPLICE_RELAY_POOL_MAX 64
/* A throttled direction wakes at least this often, so a rate raised by an update applies
 * at once, and at most this often, so it moves few large chunks. */
#define SPLICE_RELAY_RL_MAX_WAIT_NS (100 * 1000 * 1000ull)
#define SPLICE_RELAY_RL_MIN_WAIT_NS (1000 * 1000ull)
/* Pipes leave the last this many descriptors of RLIMIT_NOFILE to others (the API, the
 * tunnel's accepts, the store): connections admitted while descriptors were left would
 * otherwise take them all once their bytes began to flow. */
#define SPLICE_RELAY_FD_SPARE 32
/* A direction that found no descriptor for its pipe tries again after this long. */
#define SPLICE_RELAY_NO_PIPE_WAIT_NS SPLICE_RELAY_RL_MAX_WAIT_NS

struct relay_pipe {
    int rd, wr;
    size_t size;    /* its capacity, as the kernel reports it */
};

/* The loop is single-threaded, so one pool per process needs no lock. */
static struct relay_pipe relay_pool[SPLICE_RELAY_POOL_MAX];
static int relay_pool_len;
static int relay_pipe_size = SPLICE_RELAY_PIPE_SIZE;
/* Growing a pipe failed (pipe-user-pages-soft reached by pipes held elsewhere, say): not
 * tried again before this time, but tried again then, rather than given up for the life
 * of the process. */
static time_t relay_pipe_grow_after;

struct splice_dir {
    struct relay_pipe pipe;  /* rd == -1 when none is held */
    size_t in_pipe;          /* bytes read from the source, not yet written */
    enum relay_dir_state state;
    bool throttled;          /* rate_limit: no tokens; rl_timer resumes reading */
    bool no_pipe;            /* no descriptor for a pipe: rl_timer tries again */
    struct event *rl_timer;  /* created on the first throttle */
};

/* fd[0] is the public side, fd[1] the target; dir[i] carries bytes read from fd[i]. */
struct splice_relay {
    struct event_base *base;
    struct splice_relay_hooks hooks;
    void *arg;
    bool connected;              /* fd[1] reached the target */
    int fd[2];
    /* The four events live in this allocation's tail (event_assign; sized at run time
     * by event_get_struct_event_size, so no libevent ABI is baked in): a connection costs
     * two allocations, this and its owner's. NULL until assigned. */
    struct event *ev_read[2];
    struct event *ev_write[2];
    /* Side i's last wake-up said its peer's FIN is queued behind the bytes (EPOLLRDHUP):
     * the FIN is read in the same pass and sent on with the last bytes. */
    bool rdhup[2];
    struct splice_dir dir[2];
    /* PROXY protocol header, sent to the target before any relayed byte. */
    unsigned char pp[SPLICE_RELAY_HEADER_MAX];
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
    /* An eighth at small limits: less than accepting keeps (a quarter), so connections
     * admitted near the limit still find their pipes. */
    if (fd_limit_in_reserve(fds[0] > fds[1] ? fds[0] : fds[1], SPLICE_RELAY_FD_SPARE, 8)) {
        close(fds[0]);
        close(fds[1]);
        errno = EMFILE;
        return -1;
    }
    /* A bigger pipe moves more per splice; without it the default works. Its real size is
     * asked, not assumed: past pipe-user-pages-soft the kernel makes new pipes smaller
     * than 64 KiB, and a relay that counted on more room than the pipe has would find it
     * full with the source still readable. */
    time_t now = time(NULL);
    if (relay_pipe_size > 0 && now >= relay_pipe_grow_after &&
        fcntl(fds[1], F_SETPIPE_SZ, relay_pipe_size) < 0)
        relay_pipe_grow_after = now + 10;
    int size = fcntl(fds[1], F_GETPIPE_SZ);
    p->rd = fds[0];
    p->wr = fds[1];
    p->size = size > 0 ? (size_t)size : 4096;
    return 0;
}

/* Returns an empty pipe to the pool; a pipe still holding bytes is closed. */
static void relay_pipe_put(struct relay_pipe *p, bool empty)
{
    if (p->rd < 0)
        return;
    if (empty && relay_pool_len < SPLICE_RELAY_POOL_MAX) {
        relay_pool[relay_pool_len++] = *p;
    } else {
        close(p->rd);
        close(p->wr);
    }
    p->rd = p->wr = -1;
}

static void splice_relay_set_dir(struct splice_relay *r, int d, enum relay_dir_state next)
{
    relay_dir_set(&r->dir[d].state, next, r->hooks.log_module ? r->hooks.log_module : "splice",
                  "relay fd", (unsigned long)r->fd[0],
                  d == 0 ? "public->target" : "target->public");
}

static void splice_relay_mark_connected(struct splice_relay *r)
{
    r->connected = true;
    if (r->hooks.on_connected)
        r->hooks.on_connected(r->arg);
}

int splice_relay_target_state(struct splice_relay *r)
{
    if (r->connected)
        return 1;
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(r->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -1;
    if (err) {
        errno = err;
        return -1;
    }
    struct sockaddr_storage peer;
    len = sizeof(peer);
    if (getpeername(r->fd[1], (struct sockaddr *)&peer, &len) == 0) {
        splice_relay_mark_connected(r);
        return 1;
    }
    return errno == ENOTCONN ? 0 : -1;
}

bool splice_relay_unwatched_source_dead(const struct splice_relay *r)
{
    for (int d = 0; d < 2; d++) {
        bool unread = r->dir[d].state != RELAY_DIR_OPEN || r->dir[d].in_pipe > 0;
        if (unread && relay_dir_source_dead(r->fd[d]))
            return true;
    }
    return false;
}

void splice_relay_free(struct splice_relay *r)
{
    if (!r)
        return;
    for (int i = 0; i < 2; i++) {
        if (r->ev_read[i])
            event_del(r->ev_read[i]);
        if (r->ev_write[i])
            event_del(r->ev_write[i]);
        if (r->dir[i].rl_timer)
            event_free(r->dir[i].rl_timer);
        relay_pipe_put(&r->dir[i].pipe, r->dir[i].in_pipe == 0);
        if (r->fd[i] >= 0)
            close(r->fd[i]);
    }
    free(r);
}

/* Ends the relay from inside one of its own callbacks: hook first, then free. */
static void splice_relay_finish(struct splice_relay *r, int err)
{
    bool reached = splice_relay_target_state(r) == 1;
    if (r->hooks.on_close)
        r->hooks.on_close(err, reached, r->arg);
    splice_relay_free(r);
}

/* What of room direction d may read now (a rate limit's share). Sets throttled when
 * nothing may be read. */
static size_t relay_read_room(struct splice_relay *r, int d, size_t room)
{
    if (!r->hooks.read_room)
        return room;
    size_t allowed = r->hooks.read_room(d, room, r->arg);
    r->dir[d].throttled = allowed == 0;
    return allowed;
}

/* Reads what fd[d] has into the pipe. Returns bytes read, 0 when nothing is to be had now
 * (EAGAIN, EOF, pipe full, no rate tokens), -1 on error. */
static ssize_t relay_fill(struct splice_relay *r, int d)
{
    struct splice_dir *dir = &r->dir[d];
    if (dir->state != RELAY_DIR_OPEN)
        return 0;
    if (dir->pipe.rd < 0 && relay_pipe_get(&dir->pipe) < 0) {
        /* Out of descriptors (the process's or the system's): this connection is not
         * at fault, and closing it would turn a shortage into lost connections. Wait and
         * try again, as a rate limit waits for tokens. */
        if (errno != EMFILE && errno != ENFILE)
            return -1;
        dir->throttled = dir->no_pipe = true;
        return 0;
    }
    dir->no_pipe = false;
    size_t room = dir->pipe.size - dir->in_pipe;
    if (room == 0 || (room = relay_read_room(r, d, room)) == 0)
        return 0;
    ssize_t n = splice(r->fd[d], NULL, dir->pipe.wr, NULL, room,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (d == 1 && n >= 0 && !r->connected)
        splice_relay_mark_connected(r);  /* bytes or a FIN from the target */
    if (n > 0) {
        dir->in_pipe += (size_t)n;
        if (r->hooks.on_bytes)
            r->hooks.on_bytes(d, (size_t)n, r->arg);
        return n;
    }
    if (n == 0) {
        splice_relay_set_dir(r, d, RELAY_DIR_EOF);
        return 0;
    }
    return errno == EAGAIN ? 0 : -1;
}

/* Sends (the rest of) the PROXY protocol header to the target. Returns 1 when it is all
 * out, 0 when the target cannot take it yet (writability resumes direction 0), -1 on an
 * error. */
static int relay_send_header(struct splice_relay *r)
{
    while (r->pp_sent < r->pp_len) {
        ssize_t n = send(r->fd[1], r->pp + r->pp_sent, r->pp_len - r->pp_sent,
                         MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == ENOTCONN)) {
            event_add(r->ev_write[1], NULL);
            return 0;
        }
        if (n <= 0)
            return -1;
        r->pp_sent += (size_t)n;
    }
    if (!r->connected)
        splice_relay_mark_connected(r);
    return 1;
}

/* Writes what the pipe holds to the other side. Returns bytes written, 0 when the
 * destination is full, -1 on error. */
static ssize_t relay_drain(struct splice_relay *r, int d)
{
    struct splice_dir *dir = &r->dir[d];
    if (dir->in_pipe == 0)
        return 0;
    if (d == 0 && r->pp_sent < r->pp_len)
        return 0; /* the header goes first; relay_send_header resumes us */
    /* After the source's FIN, the FIN follows these bytes at once (relay_pump): MORE
     * holds them back until the shutdown, which sends them and the FIN in one segment
     * (one packet and one wake-up of the reader fewer per connection). */
    unsigned flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK;
    if (dir->state == RELAY_DIR_EOF)
        flags |= SPLICE_F_MORE;
    ssize_t n = splice(dir->pipe.rd, NULL, r->fd[!d], NULL, dir->in_pipe, flags);
    if (n > 0) {
        if (d == 0 && !r->connected)
            splice_relay_mark_connected(r);
        dir->in_pipe -= (size_t)n;
        return n;
    }
    return n < 0 && errno == EAGAIN ? 0 : -1;
}

/* Passes direction d's FIN on to the other side. Returns 1 done, 0 to wait (the target is
 * still connecting: a shutdown now would abort the connect, so wait until it is writable),
 * -1 when the connection must close. */
static int relay_pass_fin(struct splice_relay *r, int d)
{
    if (d == 0 && r->pp_sent < r->pp_len) {
        event_add(r->ev_write[1], NULL);
        return 0;
    }
    if (d == 0) {
        int state = splice_relay_target_state(r);
        if (state <= 0) {
            if (state == 0)
                event_add(r->ev_write[1], NULL);
            return state;
        }
    }
    /* When the other direction is finished too, the close that follows sends this FIN. */
    if (r->dir[!d].state != RELAY_DIR_FIN_SENT)
        shutdown(r->fd[!d], SHUT_WR);
    splice_relay_set_dir(r, d, RELAY_DIR_FIN_SENT);
    return 1;
}

static void relay_step(struct splice_relay *r, int d);

/* The bucket has tokens again: resume the direction that waited for them. */
static void relay_rl_resume(struct splice_relay *r, int d)
{
    r->dir[d].throttled = false;
    relay_step(r, d);
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
static int relay_throttle(struct splice_relay *r, int d)
{
    struct splice_dir *dir = &r->dir[d];
    event_del(r->ev_read[d]);
    if (!dir->rl_timer) {
        dir->rl_timer = evtimer_new(r->base, d == 0 ? relay_rl_timer0_cb : relay_rl_timer1_cb,
                                    r);
        if (!dir->rl_timer)
            return -1;
    }
    uint64_t ns = dir->no_pipe                ? SPLICE_RELAY_NO_PIPE_WAIT_NS
                  : r->hooks.read_wait_ns ? r->hooks.read_wait_ns(d, r->arg)
                                          : 0;
    if (ns < SPLICE_RELAY_RL_MIN_WAIT_NS)
        ns = SPLICE_RELAY_RL_MIN_WAIT_NS;
    if (ns > SPLICE_RELAY_RL_MAX_WAIT_NS)
        ns = SPLICE_RELAY_RL_MAX_WAIT_NS;
    struct timeval tv = {(time_t)(ns / 1000000000ull), (suseconds_t)(ns % 1000000000ull / 1000)};
    return evtimer_add(dir->rl_timer, &tv) < 0 ? -1 : 0;
}

/* Moves bytes of direction d until the source is dry or the destination is full, then
 * arms the events that will resume it. Returns -1 when the connection must close. */
static int relay_pump(struct splice_relay *r, int d)
{
    struct splice_dir *dir = &r->dir[d];
    ssize_t in, out;
    bool more;
    if (d == 0 && r->pp_sent < r->pp_len && relay_send_header(r) < 0)
        return -1;
    do {
        size_t before = dir->in_pipe;
        if ((in = relay_fill(r, d)) < 0)
            return -1;
        /* The peer's FIN is queued behind these bytes: take it now (a splice that returns
         * 0), so that the bytes and the FIN leave together rather than a wake-up apart. */
        ssize_t fin = 0;
        if (in > 0 && r->rdhup[d] && (fin = relay_fill(r, d)) < 0)
            return -1;
        in += fin;
        if ((out = relay_drain(r, d)) < 0)
            return -1;
        /* A read that did not fill the pipe took what was there: the next byte or FIN
         * comes with the next readiness, not with another splice now. */
        more = in > 0 && before + (size_t)in == dir->pipe.size;
    } while (more && (out > 0 || dir->in_pipe == 0));
    if (dir->in_pipe > 0) {
        /* Destination full: wait for it, and stop reading so the pipe stays bounded. */
        event_del(r->ev_read[d]);
        event_add(r->ev_write[!d], NULL);
        return 0;
    }
    relay_pipe_put(&dir->pipe, true);
    if (dir->throttled && dir->state == RELAY_DIR_OPEN)
        return relay_throttle(r, d);
    if (dir->state == RELAY_DIR_OPEN) {
        event_add(r->ev_read[d], NULL);
        return 0;
    }
    event_del(r->ev_read[d]);
    return dir->state == RELAY_DIR_FIN_SENT ? 0 : relay_pass_fin(r, d) < 0 ? -1 : 0;
}

static void relay_step(struct splice_relay *r, int d)
{
    if (relay_pump(r, d) < 0) {
        /* A reset or write error ends both directions. */
        splice_relay_finish(r, errno);
        return;
    }
    if (r->dir[0].state == RELAY_DIR_FIN_SENT && r->dir[1].state == RELAY_DIR_FIN_SENT)
        splice_relay_finish(r, 0);
}

static void relay_readable_cb(evutil_socket_t fd, short what, void *arg)
{
    struct splice_relay *r = arg;
    int d = fd == r->fd[0] ? 0 : 1;
    if (what & EV_CLOSED)
        r->rdhup[d] = true;
    relay_step(r, d);
}

/* fd became writable: resume the direction that writes into it. */
static void relay_writable_cb(evutil_socket_t fd, short what, void *arg)
{
    struct splice_relay *r = arg;
    relay_step(r, fd == r->fd[0] ? 1 : 0);
}

struct splice_relay *splice_relay_new(struct event_base *base, int fd0, int fd1,
                                      bool connected, const unsigned char *header,
                                      size_t len, const struct splice_relay_hooks *hooks,
                                      void *arg)
{
    size_t evsize = event_get_struct_event_size();
    size_t head = (sizeof(struct splice_relay) + 15) & ~(size_t)15;
    struct splice_relay *r = calloc(1, head + 4 * evsize);
    if (!r || len > sizeof(r->pp)) {
        free(r);
        close(fd0);
        close(fd1);
        return NULL;
    }
    r->base = base;
    r->hooks = *hooks;
    r->arg = arg;
    r->connected = connected;
    r->fd[0] = fd0;
    r->fd[1] = fd1;
    for (int i = 0; i < 2; i++)
        r->dir[i].pipe.rd = r->dir[i].pipe.wr = -1;
    if (len)
        memcpy(r->pp, header, len);
    r->pp_len = len;
    unsigned char *tail = (unsigned char *)r + head;
    for (int i = 0; i < 2; i++) {
        struct event *rd = (struct event *)(void *)(tail + (size_t)(2 * i) * evsize);
        struct event *wr = (struct event *)(void *)(tail + (size_t)(2 * i + 1) * evsize);
        /* EV_CLOSED: the wake-up also says when the peer's FIN is already queued. */
        if (event_assign(rd, base, r->fd[i], EV_READ | EV_CLOSED | EV_PERSIST,
                         relay_readable_cb, r) < 0 ||
            event_assign(wr, base, r->fd[i], EV_WRITE, relay_writable_cb, r) < 0) {
            splice_relay_free(r);
            return NULL;
        }
        r->ev_read[i] = rd;
        r->ev_write[i] = wr;
        event_add(rd, NULL);
    }
    /* The header goes as soon as the target takes it, whether or not the client speaks
     * first (a PROXY-protocol target waits for it before it says anything). */
    if (r->pp_len > 0)
        event_add(r->ev_write[1], NULL);
    return r;
}

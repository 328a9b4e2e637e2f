/* delayline: a TCP delay line for the latency bench (bench/latency.sh). Loopback only.
 *
 *   delayline -l [ADDR:]PORT -t ADDR:PORT -d MS [-m MIB] [-r MBIT] [-c CONNS] [-v]
 *
 * Listens on ADDR:PORT (default 127.0.0.1), and for each connection dials the target and
 * relays both ways, holding every byte for MS milliseconds (one way) before it writes it
 * on: a connection through it sees a round trip of 2 × MS. By default no bandwidth cap:
 * what arrives is written out as soon as it is due, however much it is. With -r each
 * direction of a connection is a link of MBIT megabits per second: bytes are serialised
 * onto it one read after the other (a read of n bytes occupies the link n × 8 / rate,
 * after the bytes before it), then travel MS; what waits for the link is the bottleneck's
 * queue, bounded by -m like the rest. That is a WAN whose bandwidth, not the CPUs of the
 * machine running the bench, is the limit, so it shows whether a path's windows reach
 * bandwidth × delay. The end of a stream (FIN) is delayed like the bytes before it. What
 * the delay line does not delay: the TCP handshake (the accept completes on loopback) and
 * the kernel's acknowledgements (each side's TCP talks to the delay line, not to the far
 * end), so only flow control that travels in the data, such as the tunnel's WindowUpdate or
 * ssh's WINDOW_ADJUST, pays the round trip.
 *
 * Memory: each direction of a connection holds at most -m MiB (default 64) read but not yet
 * written; over that it stops reading (the sender's TCP window closes: backpressure) until
 * the far side has taken half of it. Held bytes sit in one evbuffer per direction with a
 * queue of (due time, length) marks, at most DL_MAX_MARKS of them (past that the newest
 * mark takes in the new bytes: they are held a little longer, never shorter). At most -c
 * connections (default 128) at a time; more are closed at accept.
 *
 * Built by bench/latency.sh with cc (not part of the product's CMake build). SIGINT/SIGTERM
 * end it cleanly. */
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <event2/util.h>

#define DL_READ_CHUNK (256u * 1024u) /* one readv: libevent's own reads stop at 4 KiB */
#define DL_MAX_MARKS 65536u          /* per direction: bounds the queue whatever the reads */
#define DL_FIRST_MARKS 64u
#define DL_MAX_LOG_LINES 20u         /* peer-triggered error lines; then only a count */

struct dl;
struct dl_conn;

struct dl_mark {
    uint64_t due_us; /* CLOCK_MONOTONIC */
    size_t len;
    int eof; /* the sender's FIN: passed on once the bytes before it are out */
};

/* One direction of a connection: bytes read from `from` wait in q until due, then go to `to`. */
struct dl_dir {
    struct dl_conn *c;
    int from, to;
    struct event *rd, *wr, *timer;
    struct evbuffer *q; /* read, not yet written; the first `ready` bytes are due */
    size_t ready;
    struct dl_mark *marks; /* ring */
    size_t mcap, mhead, mlen;
    int eof_in;  /* FIN read (its mark is queued) */
    int eof_due; /* FIN mark due: shut `to` once ready is written */
    int shut;    /* shutdown(to, SHUT_WR) done */
    int paused;  /* reading stopped by the cap */
    uint64_t link_free_us; /* -r: when the link has serialised what was read so far */
};

struct dl_conn {
    struct dl *dl;
    int fd_in, fd_out; /* accepted side, target side */
    int connected;     /* target connect finished */
    struct event *connect_ev;
    struct dl_dir up;   /* accepted -> target */
    struct dl_dir down; /* target -> accepted */
    struct dl_conn *prev, *next;
};

struct dl {
    struct event_base *base;
    struct evconnlistener *lis;
    struct sockaddr_storage target;
    int target_len;
    uint64_t delay_us;
    uint64_t rate_bps; /* -r in bits per second; 0: no cap */
    size_t cap;
    unsigned max_conns, nconns;
    struct dl_conn *conns;
    struct event *sig_int, *sig_term;
    int verbose;
    unsigned log_lines, log_dropped;
};

static uint64_t dl_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Peer-triggered lines are bounded: the first DL_MAX_LOG_LINES, then a count at exit. */
static void dl_log(struct dl *dl, const char *what, int err)
{
    if (dl->log_lines >= DL_MAX_LOG_LINES) {
        dl->log_dropped++;
        return;
    }
    dl->log_lines++;
    if (err)
        fprintf(stderr, "delayline: %s: %s\n", what, strerror(err));
    else
        fprintf(stderr, "delayline: %s\n", what);
}

static void dl_conn_free(struct dl_conn *c);

static void dl_dir_clear(struct dl_dir *d)
{
    if (d->rd)
        event_free(d->rd);
    if (d->wr)
        event_free(d->wr);
    if (d->timer)
        event_free(d->timer);
    if (d->q)
        evbuffer_free(d->q);
    free(d->marks);
    memset(d, 0, sizeof(*d));
}

static void dl_conn_free(struct dl_conn *c)
{
    if (!c)
        return;
    struct dl *dl = c->dl;
    if (c->prev)
        c->prev->next = c->next;
    else if (dl->conns == c)
        dl->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    dl->nconns--;
    if (c->connect_ev)
        event_free(c->connect_ev);
    dl_dir_clear(&c->up);
    dl_dir_clear(&c->down);
    if (c->fd_in >= 0)
        close(c->fd_in);
    if (c->fd_out >= 0)
        close(c->fd_out);
    free(c);
}

static int dl_mark_push(struct dl_dir *d, uint64_t due, size_t len, int eof)
{
    if (d->mlen > 0) {
        struct dl_mark *last = &d->marks[(d->mhead + d->mlen - 1) % d->mcap];
        /* Same instant (one loop iteration), or the ring is full: the newest mark takes the
         * bytes, with the later due time, so no byte leaves before its delay. */
        if (!eof && !last->eof && (last->due_us == due || d->mlen == DL_MAX_MARKS)) {
            last->len += len;
            last->due_us = due;
            return 0;
        }
    }
    if (d->mlen == d->mcap) {
        if (d->mcap == DL_MAX_MARKS && eof)
            return -1; /* cannot happen: a FIN is queued once, and the ring merges data */
        size_t ncap = d->mcap ? d->mcap * 2 : DL_FIRST_MARKS;
        if (ncap > DL_MAX_MARKS)
            ncap = DL_MAX_MARKS;
        struct dl_mark *m = malloc(ncap * sizeof(*m));
        if (!m)
            return -1;
        for (size_t i = 0; i < d->mlen; i++)
            m[i] = d->marks[(d->mhead + i) % d->mcap];
        free(d->marks);
        d->marks = m;
        d->mcap = ncap;
        d->mhead = 0;
    }
    d->marks[(d->mhead + d->mlen) % d->mcap] = (struct dl_mark){due, len, eof};
    d->mlen++;
    return 0;
}

/* Re-arms the timer for the oldest mark that is not due yet. */
static void dl_dir_arm_timer(struct dl_dir *d, uint64_t now)
{
    if (d->mlen == 0) {
        event_del(d->timer);
        return;
    }
    uint64_t due = d->marks[d->mhead].due_us;
    uint64_t wait = due > now ? due - now : 0;
    struct timeval tv = {(time_t)(wait / 1000000u), (suseconds_t)(wait % 1000000u)};
    event_add(d->timer, &tv);
}

static void dl_dir_resume(struct dl_dir *d)
{
    /* Read again only once the far side took half the cap, or we flap at the edge. */
    if (d->paused && evbuffer_get_length(d->q) <= d->c->dl->cap / 2) {
        d->paused = 0;
        if (!d->eof_in)
            event_add(d->rd, NULL);
    }
}

/* Moves the marks that are due into `ready`, writes what is ready, passes a due FIN on,
 * and re-arms the events. Returns -1 when the connection was freed. */
static int dl_dir_advance(struct dl_dir *d)
{
    struct dl_conn *c = d->c;
    uint64_t now = dl_now_us();
    while (d->mlen > 0 && d->marks[d->mhead].due_us <= now) {
        struct dl_mark *m = &d->marks[d->mhead];
        d->ready += m->len;
        if (m->eof)
            d->eof_due = 1;
        d->mhead = (d->mhead + 1) % d->mcap;
        d->mlen--;
    }
    if (d->ready > 0 && c->connected) {
        int n = evbuffer_write_atmost(d->q, d->to, (ev_ssize_t)d->ready);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            dl_log(c->dl, d == &c->up ? "write to target" : "write to client", errno);
            dl_conn_free(c);
            return -1;
        }
        if (n > 0) {
            d->ready -= (size_t)n;
            dl_dir_resume(d);
        }
    }
    if (d->ready > 0 && c->connected)
        event_add(d->wr, NULL);
    else
        event_del(d->wr);
    if (d->ready == 0 && d->eof_due && !d->shut && c->connected) {
        shutdown(d->to, SHUT_WR);
        d->shut = 1;
        struct dl_dir *o = d == &c->up ? &c->down : &c->up;
        if (o->shut) { /* both ways done */
            dl_conn_free(c);
            return -1;
        }
    }
    dl_dir_arm_timer(d, now);
    return 0;
}

static void dl_on_timer(evutil_socket_t fd, short what, void *arg)
{
    dl_dir_advance(arg);
}

static void dl_on_writable(evutil_socket_t fd, short what, void *arg)
{
    dl_dir_advance(arg);
}

static void dl_on_readable(evutil_socket_t fd, short what, void *arg)
{
    struct dl_dir *d = arg;
    struct dl_conn *c = d->c;
    struct evbuffer_iovec vec[2];
    int nvec = evbuffer_reserve_space(d->q, DL_READ_CHUNK, vec, 2);
    if (nvec < 0) {
        dl_log(c->dl, "out of memory", ENOMEM);
        dl_conn_free(c);
        return;
    }
    struct iovec iov[2];
    for (int i = 0; i < nvec; i++) {
        iov[i].iov_base = vec[i].iov_base;
        iov[i].iov_len = vec[i].iov_len;
    }
    ssize_t n = readv(d->from, iov, nvec);
    if (n < 0) {
        evbuffer_commit_space(d->q, vec, 0);
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        dl_log(c->dl, d == &c->up ? "read from client" : "read from target", errno);
        dl_conn_free(c);
        return;
    }
    /* Commit exactly what readv filled, spread over the reserved extents in order. */
    size_t left = (size_t)n;
    for (int i = 0; i < nvec; i++) {
        size_t take = left < vec[i].iov_len ? left : vec[i].iov_len;
        vec[i].iov_len = take;
        left -= take;
    }
    evbuffer_commit_space(d->q, vec, n > 0 ? nvec : 0);
    uint64_t now = dl_now_us(), due = now + c->dl->delay_us;
    if (c->dl->rate_bps) {
        /* On the link once what came before is on it; n × 8 / rate seconds to send. */
        uint64_t start = d->link_free_us > now ? d->link_free_us : now;
        d->link_free_us = start + ((uint64_t)n * 8u * 1000000u + c->dl->rate_bps - 1) /
                                      c->dl->rate_bps;
        due = d->link_free_us + c->dl->delay_us;
    }
    int was_idle = d->mlen == 0;
    if (n == 0) {
        d->eof_in = 1;
        event_del(d->rd);
    } else if (evbuffer_get_length(d->q) >= c->dl->cap) {
        d->paused = 1;
        event_del(d->rd);
    }
    if (dl_mark_push(d, due, (size_t)n, n == 0) < 0) {
        dl_log(c->dl, "out of memory", ENOMEM);
        dl_conn_free(c);
        return;
    }
    if (was_idle)
        dl_dir_arm_timer(d, now);
}

static int dl_dir_init(struct dl_conn *c, struct dl_dir *d, int from, int to)
{
    struct event_base *b = c->dl->base;
    d->c = c;
    d->from = from;
    d->to = to;
    d->rd = event_new(b, from, EV_READ | EV_PERSIST, dl_on_readable, d);
    d->wr = event_new(b, to, EV_WRITE | EV_PERSIST, dl_on_writable, d);
    d->timer = evtimer_new(b, dl_on_timer, d);
    d->q = evbuffer_new();
    return d->rd && d->wr && d->timer && d->q ? 0 : -1;
}

static void dl_on_connected(evutil_socket_t fd, short what, void *arg)
{
    struct dl_conn *c = arg;
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err == EINPROGRESS)
        return;
    if (err) {
        dl_log(c->dl, "connect to target", err);
        dl_conn_free(c);
        return;
    }
    event_free(c->connect_ev);
    c->connect_ev = NULL;
    c->connected = 1;
    event_add(c->down.rd, NULL);
    dl_dir_advance(&c->up); /* anything the client sent meanwhile and is due already */
}

static void dl_nodelay(int fd)
{
    /* The delay is ours to add: no Nagle on top of it. */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static void dl_on_accept(struct evconnlistener *lis, evutil_socket_t fd, struct sockaddr *sa,
                         int salen, void *arg)
{
    struct dl *dl = arg;
    struct dl_conn *c = NULL;
    int out = -1;
    if (dl->nconns >= dl->max_conns) {
        dl_log(dl, "too many connections, refusing one", 0);
        goto fail;
    }
    out = socket(dl->target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (out < 0) {
        dl_log(dl, "socket", errno);
        goto fail;
    }
    dl_nodelay(fd);
    dl_nodelay(out);
    if (connect(out, (struct sockaddr *)&dl->target, (socklen_t)dl->target_len) < 0 &&
        errno != EINPROGRESS) {
        dl_log(dl, "connect to target", errno);
        goto fail;
    }
    c = calloc(1, sizeof(*c));
    if (!c)
        goto fail;
    c->dl = dl;
    c->fd_in = fd;
    c->fd_out = out;
    c->next = dl->conns;
    if (dl->conns)
        dl->conns->prev = c;
    dl->conns = c;
    dl->nconns++;
    fd = out = -1; /* the connection owns them now */
    c->connect_ev = event_new(dl->base, c->fd_out, EV_WRITE | EV_PERSIST, dl_on_connected, c);
    if (!c->connect_ev || dl_dir_init(c, &c->up, c->fd_in, c->fd_out) < 0 ||
        dl_dir_init(c, &c->down, c->fd_out, c->fd_in) < 0 ||
        event_add(c->connect_ev, NULL) < 0 || event_add(c->up.rd, NULL) < 0) {
        dl_log(dl, "out of memory", ENOMEM);
        dl_conn_free(c);
    }
    return;
fail:
    if (out >= 0)
        close(out);
    if (fd >= 0)
        close(fd);
}

static void dl_on_signal(evutil_socket_t sig, short what, void *arg)
{
    event_base_loopbreak(arg);
}

static void dl_usage(FILE *f)
{
    fprintf(f, "usage: delayline -l [ADDR:]PORT -t ADDR:PORT -d MS [-m MIB] [-r MBIT] [-c CONNS] "
               "[-v]\n"
               "  -l  listen address (default address 127.0.0.1)\n"
               "  -t  target (numeric IPv4 or [IPv6]:port)\n"
               "  -d  one-way delay in milliseconds, 0..60000 (round trip = 2 x MS)\n"
               "  -m  bytes held per direction of a connection, MiB (default 64, 1..4096)\n"
               "  -r  bandwidth of each direction of a connection, Mbit/s (1..1000000; "
               "default: no cap)\n"
               "  -c  connections at a time (default 128, 1..10000)\n"
               "  -v  print the settings at start and a summary at exit\n");
}

static int dl_parse_num(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    struct dl dl = {.max_conns = 128, .cap = 64u << 20};
    const char *listen_arg = NULL, *target_arg = NULL;
    long delay_ms = -1, v;
    struct sockaddr_storage la;
    int la_len = sizeof(la), opt, rc = 1;
    struct event_config *cfg = NULL;

    while ((opt = getopt(argc, argv, "l:t:d:m:r:c:vh")) != -1) {
        switch (opt) {
        case 'l': listen_arg = optarg; break;
        case 't': target_arg = optarg; break;
        case 'd':
            if (dl_parse_num(optarg, 0, 60000, &delay_ms) < 0)
                goto bad;
            break;
        case 'm':
            if (dl_parse_num(optarg, 1, 4096, &v) < 0)
                goto bad;
            dl.cap = (size_t)v << 20;
            break;
        case 'r':
            if (dl_parse_num(optarg, 1, 1000000, &v) < 0)
                goto bad;
            dl.rate_bps = (uint64_t)v * 1000000u;
            break;
        case 'c':
            if (dl_parse_num(optarg, 1, 10000, &v) < 0)
                goto bad;
            dl.max_conns = (unsigned)v;
            break;
        case 'v': dl.verbose = 1; break;
        case 'h': dl_usage(stdout); return 0;
        default: goto bad;
        }
    }
    if (optind != argc || !listen_arg || !target_arg || delay_ms < 0)
        goto bad;
    dl.delay_us = (uint64_t)delay_ms * 1000u;

    char lbuf[80];
    if (strchr(listen_arg, ':') == NULL) { /* a bare port: loopback */
        if (dl_parse_num(listen_arg, 1, 65535, &v) < 0)
            goto bad;
        snprintf(lbuf, sizeof(lbuf), "127.0.0.1:%ld", v);
        listen_arg = lbuf;
    }
    memset(&la, 0, sizeof(la));
    if (evutil_parse_sockaddr_port(listen_arg, (struct sockaddr *)&la, &la_len) < 0) {
        fprintf(stderr, "delayline: bad listen address %s\n", listen_arg);
        return 2;
    }
    dl.target_len = sizeof(dl.target);
    if (evutil_parse_sockaddr_port(target_arg, (struct sockaddr *)&dl.target, &dl.target_len) < 0 ||
        ((struct sockaddr_in *)&dl.target)->sin_port == 0) {
        fprintf(stderr, "delayline: bad target %s (ADDR:PORT, numeric)\n", target_arg);
        return 2;
    }

    signal(SIGPIPE, SIG_IGN);
    /* Timers to the microsecond (timerfd), not epoll_wait's milliseconds rounded up. */
    cfg = event_config_new();
    if (!cfg)
        goto out;
    event_config_set_flag(cfg, EVENT_BASE_FLAG_PRECISE_TIMER);
    dl.base = event_base_new_with_config(cfg);
    event_config_free(cfg);
    if (!dl.base)
        goto out;
    dl.lis = evconnlistener_new_bind(dl.base, dl_on_accept, &dl,
                                     LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_FREE |
                                         LEV_OPT_CLOSE_ON_EXEC,
                                     128, (struct sockaddr *)&la, la_len);
    if (!dl.lis) {
        fprintf(stderr, "delayline: cannot listen on %s: %s\n", listen_arg,
                strerror(errno));
        goto out;
    }
    dl.sig_int = evsignal_new(dl.base, SIGINT, dl_on_signal, dl.base);
    dl.sig_term = evsignal_new(dl.base, SIGTERM, dl_on_signal, dl.base);
    if (!dl.sig_int || !dl.sig_term || evsignal_add(dl.sig_int, NULL) < 0 ||
        evsignal_add(dl.sig_term, NULL) < 0)
        goto out;
    if (dl.verbose) {
        char bw[40] = "no bandwidth cap";
        if (dl.rate_bps)
            snprintf(bw, sizeof(bw), "%llu Mbit/s", (unsigned long long)(dl.rate_bps / 1000000u));
        printf("delayline: %s -> %s, %ld ms each way, %zu MiB per direction, %u connections, %s\n",
               listen_arg, target_arg, delay_ms, dl.cap >> 20, dl.max_conns, bw);
    }
    fflush(stdout);
    event_base_dispatch(dl.base);
    rc = 0;
out:
    while (dl.conns)
        dl_conn_free(dl.conns);
    if (dl.log_dropped)
        fprintf(stderr, "delayline: %u more error lines suppressed\n", dl.log_dropped);
    if (dl.sig_int)
        event_free(dl.sig_int);
    if (dl.sig_term)
        event_free(dl.sig_term);
    if (dl.lis)
        evconnlistener_free(dl.lis);
    if (dl.base)
        event_base_free(dl.base);
    return rc;
bad:
    dl_usage(stderr);
    return 2;
}

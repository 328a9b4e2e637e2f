/* Direct mode: public socket <-> target socket.
 *
 * The target is dialled with a bufferevent (it brings evdns host names and the connect
 * timeout); once connected its fd is taken over and both sockets are relayed with
 * splice(2) through a pipe, so payload bytes never enter user space: two syscalls per
 * chunk, no copies, no evbuffer memory. Backpressure is the pipe itself: when the
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
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/bufferevent.h>
#include <event2/dns.h>
#include <event2/event.h>

#include "config.h"
#include "log.h"
#include "mapping.h"
#include "server.h"

/* Bytes one direction may hold in flight (in its pipe) before reading pauses. */
#define RELAY_PIPE_SIZE (256 * 1024)
/* Empty pipes kept for reuse; more are closed. */
#define RELAY_POOL_MAX 64

struct relay_pipe {
    int rd, wr;
};

/* The loop is single-threaded, so one pool per process needs no lock. */
static struct relay_pipe relay_pool[RELAY_POOL_MAX];
static int relay_pool_len;
static int relay_pipe_size = RELAY_PIPE_SIZE;

struct relay_dir {
    struct relay_pipe pipe;  /* rd == -1 when none is held */
    size_t in_pipe;          /* bytes read from the source, not yet written */
    bool eof;                /* the source sent FIN */
    bool shut;               /* the FIN was passed on to the destination */
};

/* fd[0] is the public side, fd[1] the target; dir[i] carries bytes read from fd[i]. */
struct forward_conn {
    struct mapping_conn mc;      /* first: mapping removal aborts through it */
    struct bufferevent *dialer;  /* only while connecting */
    int fd[2];
    struct event *ev_read[2];
    struct event *ev_write[2];
    struct relay_dir dir[2];
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

static void forward_free(struct forward_conn *fc, bool failed)
{
    mapping_conn_end(&fc->mc, failed);
    if (fc->dialer)
        bufferevent_free(fc->dialer);
    for (int i = 0; i < 2; i++) {
        if (fc->ev_read[i])
            event_free(fc->ev_read[i]);
        if (fc->ev_write[i])
            event_free(fc->ev_write[i]);
        relay_pipe_put(&fc->dir[i].pipe, fc->dir[i].in_pipe == 0);
        if (fc->fd[i] >= 0)
            close(fc->fd[i]);
    }
    free(fc);
}

static void forward_abort(struct mapping_conn *mc)
{
    struct forward_conn *fc = (struct forward_conn *)mc;
    forward_free(fc, fc->dialer != NULL);
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Reads what fd[d] has into the pipe. Returns bytes read, 0 when nothing is to be had now
 * (EAGAIN, EOF, pipe full), -1 on error. */
static ssize_t relay_fill(struct forward_conn *fc, int d)
{
    struct relay_dir *dir = &fc->dir[d];
    size_t room = (size_t)(relay_pipe_size ? relay_pipe_size : 65536) - dir->in_pipe;
    if (dir->eof || room == 0)
        return 0;
    if (dir->pipe.rd < 0 && relay_pipe_get(&dir->pipe) < 0)
        return -1;
    ssize_t n = splice(fc->fd[d], NULL, dir->pipe.wr, NULL, room,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n > 0) {
        dir->in_pipe += (size_t)n;
        mapping_conn_add_bytes(&fc->mc, d == 0 ? (uint64_t)n : 0, d == 0 ? 0 : (uint64_t)n);
        return n;
    }
    if (n == 0) {
        dir->eof = true;
        return 0;
    }
    return errno == EAGAIN ? 0 : -1;
}

/* Writes what the pipe holds to the other side. Returns bytes written, 0 when the
 * destination is full, -1 on error. */
static ssize_t relay_drain(struct forward_conn *fc, int d)
{
    struct relay_dir *dir = &fc->dir[d];
    if (dir->in_pipe == 0)
        return 0;
    ssize_t n = splice(dir->pipe.rd, NULL, fc->fd[!d], NULL, dir->in_pipe,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n > 0) {
        dir->in_pipe -= (size_t)n;
        return n;
    }
    return n < 0 && errno == EAGAIN ? 0 : -1;
}

/* Moves bytes of direction d until the source is dry or the destination is full, then
 * arms the events that will resume it. Returns -1 when the connection must close. */
static int relay_pump(struct forward_conn *fc, int d)
{
    struct relay_dir *dir = &fc->dir[d];
    ssize_t in, out;
    do {
        if ((in = relay_fill(fc, d)) < 0 || (out = relay_drain(fc, d)) < 0)
            return -1;
    } while (in > 0 && (out > 0 || dir->in_pipe == 0));
    if (dir->in_pipe > 0) {
        /* Destination full: wait for it, and stop reading so the pipe stays bounded. */
        event_del(fc->ev_read[d]);
        event_add(fc->ev_write[!d], NULL);
        return 0;
    }
    relay_pipe_put(&dir->pipe, true);
    if (dir->eof) {
        event_del(fc->ev_read[d]);
        if (!dir->shut) {
            shutdown(fc->fd[!d], SHUT_WR);
            dir->shut = true;
        }
    } else {
        event_add(fc->ev_read[d], NULL);
    }
    return 0;
}

static void relay_step(struct forward_conn *fc, int d)
{
    if (relay_pump(fc, d) < 0) {
        forward_free(fc, false);  /* a reset or write error ends both directions */
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
    return 0;
}

/* Takes the connected socket out of the dialer, which is freed (safe inside its callback:
 * libevent defers the free until the callback returns). */
static void forward_connected(struct forward_conn *fc)
{
    fc->fd[1] = bufferevent_getfd(fc->dialer);
    bufferevent_setfd(fc->dialer, -1);
    bufferevent_free(fc->dialer);
    fc->dialer = NULL;
    set_nodelay(fc->fd[1]);
    if (relay_start(fc) < 0)
        forward_free(fc, false);
}

static void forward_dial_cb(struct bufferevent *bev, short what, void *arg)
{
    struct forward_conn *fc = arg;
    if (what & BEV_EVENT_CONNECTED) {
        forward_connected(fc);
        return;
    }
    /* Refused, unreachable, unresolvable or timed out: the public side learns it at once. */
    struct mapping *m = fc->mc.mapping;
    int dns = bufferevent_socket_get_dns_error(bev);
    log_debug("forward", "port %d: connect to %s:%d failed: %s", m->rec.port,
              mapping_target_host(m), m->rec.target_port,
              dns ? evutil_gai_strerror(dns)
                  : (what & BEV_EVENT_TIMEOUT) ? "timed out"
                                               : strerror(EVUTIL_SOCKET_ERROR()));
    forward_free(fc, true);
}

void forward_start(struct mapping *m, evutil_socket_t fd)
{
    struct forward_conn *fc = calloc(1, sizeof(*fc));
    if (!fc) {
        close(fd);
        return;
    }
    fc->fd[0] = fd;
    fc->fd[1] = -1;
    for (int i = 0; i < 2; i++)
        fc->dir[i].pipe.rd = fc->dir[i].pipe.wr = -1;
    mapping_conn_begin(m, &fc->mc, forward_abort);
    evutil_make_socket_nonblocking(fd);
    set_nodelay(fd);
    fc->dialer = bufferevent_socket_new(m->srv->base, -1, BEV_OPT_CLOSE_ON_FREE);
    if (!fc->dialer) {
        forward_free(fc, true);
        return;
    }
    bufferevent_setcb(fc->dialer, NULL, NULL, forward_dial_cb, fc);
    /* A target that never answers fails after tunnel.connect_timeout rather than the
     * kernel's two minutes (the write timeout covers the connect). */
    struct timeval tv = {m->srv->cfg->connect_timeout, 0};
    bufferevent_set_timeouts(fc->dialer, NULL, &tv);
    /* Public bytes wait in the kernel until the target is connected: nothing reads fd[0]
     * before relay_start. */
    if (bufferevent_socket_connect_hostname(fc->dialer, m->srv->dns, AF_UNSPEC,
                                            mapping_target_host(m), m->rec.target_port) < 0)
        forward_free(fc, true);  /* refused before starting; the callback never ran */
}

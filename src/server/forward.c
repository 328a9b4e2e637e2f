/* Direct mode relay, shaped after libevent's sample/le-proxy.c: two bufferevents, data
 * moved between their evbuffers without copies, and backpressure through watermarks (when
 * one side's output passes RELAY_MAX_OUTPUT, reading from the other side stops until the
 * output drained below half of it). Half-close as OpenSSH's nchan.c does it: each
 * direction has its own state; EOF on one side becomes shutdown(SHUT_WR) on the other once
 * everything before it was written, and the pair is freed only when both directions are
 * done, or at once on an error. */
#include "forward.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/dns.h>
#include <event2/event.h>

#include "log.h"
#include "config.h"
#include "mapping.h"
#include "server.h"

/* Bytes queued towards one side before reading from the other side pauses. */
#define RELAY_MAX_OUTPUT (256 * 1024)
/* Largest read in one go; larger reads mean fewer syscalls on bulk transfers. */
#define RELAY_MAX_READ (128 * 1024)

enum relay_side { SIDE_PUBLIC = 0, SIDE_TARGET = 1 };

struct relay_dir_state {
    bool eof_read;      /* this side sent FIN: no more input from it */
    bool shut_written;  /* we sent FIN to this side */
};

struct forward_conn {
    struct mapping_conn mc;            /* first: mapping removal aborts through it */
    struct bufferevent *bev[2];        /* [SIDE_PUBLIC], [SIDE_TARGET] */
    struct relay_dir_state st[2];
    bool connected;                    /* target connect completed */
};

static void relay_read_cb(struct bufferevent *bev, void *arg);
static void relay_write_cb(struct bufferevent *bev, void *arg);
static void relay_event_cb(struct bufferevent *bev, short what, void *arg);

static enum relay_side side_of(struct forward_conn *fc, struct bufferevent *bev)
{
    return bev == fc->bev[SIDE_PUBLIC] ? SIDE_PUBLIC : SIDE_TARGET;
}

static void forward_free(struct forward_conn *fc, bool failed)
{
    mapping_conn_end(&fc->mc, failed);
    for (int i = 0; i < 2; i++)
        if (fc->bev[i])
            bufferevent_free(fc->bev[i]);
    free(fc);
}

static void forward_abort(struct mapping_conn *mc)
{
    struct forward_conn *fc = (struct forward_conn *)mc;
    forward_free(fc, !fc->connected);
}

static void set_nodelay(evutil_socket_t fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Both directions done (each side sent FIN and received ours): free the pair. */
static bool relay_finished(struct forward_conn *fc)
{
    return fc->st[0].eof_read && fc->st[1].eof_read && fc->st[0].shut_written &&
           fc->st[1].shut_written;
}

/* Passes a FIN from `from` on to the other side once its output is flushed. */
static void relay_maybe_shutdown(struct forward_conn *fc, enum relay_side to)
{
    enum relay_side from = !to;
    if (!fc->st[from].eof_read || fc->st[to].shut_written)
        return;
    struct evbuffer *out = bufferevent_get_output(fc->bev[to]);
    if (evbuffer_get_length(out) > 0) {
        /* Ask for a write callback at empty, then shut down from there. */
        bufferevent_setwatermark(fc->bev[to], EV_WRITE, 0, 0);
        return;
    }
    shutdown(bufferevent_getfd(fc->bev[to]), SHUT_WR);
    fc->st[to].shut_written = true;
}

/* Moves everything readable from `from` to the other side; pauses `from` when the other
 * side's output is full. */
static void relay_move(struct forward_conn *fc, enum relay_side from)
{
    enum relay_side to = !from;
    struct evbuffer *in = bufferevent_get_input(fc->bev[from]);
    struct evbuffer *out = bufferevent_get_output(fc->bev[to]);
    size_t n = evbuffer_get_length(in);
    if (n == 0)
        return;
    evbuffer_add_buffer(out, in);
    mapping_conn_add_bytes(&fc->mc, from == SIDE_PUBLIC ? n : 0, from == SIDE_PUBLIC ? 0 : n);
    if (evbuffer_get_length(out) >= RELAY_MAX_OUTPUT) {
        bufferevent_disable(fc->bev[from], EV_READ);
        bufferevent_setwatermark(fc->bev[to], EV_WRITE, RELAY_MAX_OUTPUT / 2, 0);
    }
}

static void relay_read_cb(struct bufferevent *bev, void *arg)
{
    struct forward_conn *fc = arg;
    relay_move(fc, side_of(fc, bev));
}

/* The output of `bev` drained to its low watermark: resume the other side, and pass on a
 * pending FIN when everything was written. */
static void relay_write_cb(struct bufferevent *bev, void *arg)
{
    struct forward_conn *fc = arg;
    enum relay_side to = side_of(fc, bev);
    enum relay_side from = !to;
    if (!fc->st[from].eof_read) {
        bufferevent_setwatermark(bev, EV_WRITE, 0, 0);
        bufferevent_enable(fc->bev[from], EV_READ);
        return;
    }
    relay_maybe_shutdown(fc, to);
    if (relay_finished(fc))
        forward_free(fc, false);
}

static void relay_on_eof(struct forward_conn *fc, enum relay_side side)
{
    relay_move(fc, side);  /* whatever arrived with the FIN */
    fc->st[side].eof_read = true;
    bufferevent_disable(fc->bev[side], EV_READ);
    relay_maybe_shutdown(fc, !side);
    if (relay_finished(fc))
        forward_free(fc, false);
}

static void relay_start(struct forward_conn *fc)
{
    fc->connected = true;
    bufferevent_set_timeouts(fc->bev[SIDE_TARGET], NULL, NULL);
    set_nodelay(bufferevent_getfd(fc->bev[SIDE_TARGET]));
    for (int i = 0; i < 2; i++) {
        bufferevent_setcb(fc->bev[i], relay_read_cb, relay_write_cb, relay_event_cb, fc);
        bufferevent_set_max_single_read(fc->bev[i], RELAY_MAX_READ);
        bufferevent_set_max_single_write(fc->bev[i], RELAY_MAX_READ);
        bufferevent_enable(fc->bev[i], EV_READ | EV_WRITE);
    }
}

static void relay_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct forward_conn *fc = arg;
    enum relay_side side = side_of(fc, bev);
    if (what & BEV_EVENT_CONNECTED) {
        relay_start(fc);
        return;
    }
    if (!fc->connected) {
        /* The target refused or could not be resolved: the public side learns it at once. */
        int err = EVUTIL_SOCKET_ERROR();
        int dns = bufferevent_socket_get_dns_error(bev);
        log_debug("forward", "port %d: connect to %s:%d failed: %s", fc->mc.mapping->rec.port,
                  mapping_target_host(fc->mc.mapping), fc->mc.mapping->rec.target_port,
                  dns ? evutil_gai_strerror(dns) : evutil_socket_error_to_string(err));
        forward_free(fc, true);
        return;
    }
    if ((what & BEV_EVENT_EOF) && (what & BEV_EVENT_READING)) {
        relay_on_eof(fc, side);
        return;
    }
    /* A reset or write error on either side ends both directions. */
    forward_free(fc, false);
}

void forward_start(struct mapping *m, evutil_socket_t fd)
{
    struct event_base *base = m->srv->base;
    struct forward_conn *fc = calloc(1, sizeof(*fc));
    if (!fc) {
        evutil_closesocket(fd);
        return;
    }
    mapping_conn_begin(m, &fc->mc, forward_abort);
    evutil_make_socket_nonblocking(fd);
    set_nodelay(fd);
    fc->bev[SIDE_PUBLIC] = bufferevent_socket_new(base, fd, BEV_OPT_CLOSE_ON_FREE);
    fc->bev[SIDE_TARGET] = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);
    if (!fc->bev[SIDE_PUBLIC] || !fc->bev[SIDE_TARGET]) {
        if (!fc->bev[SIDE_PUBLIC])
            evutil_closesocket(fd);
        forward_free(fc, true);
        return;
    }
    /* Public input waits until the target is connected; nothing is read before. */
    bufferevent_setcb(fc->bev[SIDE_PUBLIC], NULL, NULL, relay_event_cb, fc);
    bufferevent_setcb(fc->bev[SIDE_TARGET], NULL, NULL, relay_event_cb, fc);
    /* A target that never answers fails the connection after tunnel.connect_timeout rather
     * than the kernel's two minutes (the write timeout covers the connect). */
    struct timeval connect_tv = {m->srv->cfg->connect_timeout, 0};
    bufferevent_set_timeouts(fc->bev[SIDE_TARGET], NULL, &connect_tv);
    if (bufferevent_socket_connect_hostname(fc->bev[SIDE_TARGET], m->srv->dns, AF_UNSPEC,
                                            mapping_target_host(m), m->rec.target_port) < 0) {
        log_debug("forward", "port %d: cannot start connect to %s:%d", m->rec.port,
                  mapping_target_host(m), m->rec.target_port);
        forward_free(fc, true);
    }
}

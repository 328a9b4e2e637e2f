/* A public connection carried through a tunnel session: pending -> bridged -> flushing,
 * one end. See tunnel_stream.h. */
#include "tunnel_stream.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "bridge.h"
#include "frame.h"
#include "log.h"
#include "mapping.h"
#include "mux.h"
#include "proxy_header.h"
#include "sockread.h"

#define TSTREAM_MOD "tunnel"

enum tstream_state {
    TSTREAM_PENDING,   /* waiting for the ConnectResponse: st, fd and timer held here */
    TSTREAM_BRIDGED,   /* the bridge owns the socket and the stream */
    TSTREAM_FLUSHING,  /* bridged, and the session is gone: the bridge drains its output */
};

/* What went away by itself before the end: the end must not touch it again. */
enum tstream_gone {
    TSTREAM_GONE_NONE,
    TSTREAM_GONE_STREAM,   /* the mux ended the stream (refusal, Close, session freed) */
    TSTREAM_GONE_BRIDGE,   /* the bridge finished and frees itself after its hook */
};

struct tunnel_stream {
    TAILQ_ENTRY(tunnel_stream) link;
    struct mapping_conn mc;
    enum tstream_state state;
    struct tunnel_stream_set *set;  /* NULL when flushing (or refused before a session) */
    struct mux_stream *st;          /* pending only */
    evutil_socket_t fd;             /* pending only, unless bev holds it */
    struct bufferevent *bev;        /* pending with optimistic data: the public socket, its
                                     * first bytes sent ahead of the ConnectResponse */
    bool bev_ended;                 /* that socket reported EOF or an error: read no more */
    struct event *timer;            /* pending only: connect_timeout */
    struct bridge *bridge;          /* bridged and flushing */
};

/* The one end, from any state: releases what is still held, leaves the set, and ends the
 * mapping connection (failed when it never reached its target). */
static void tstream_end(struct tunnel_stream *t, enum tstream_gone gone)
{
    if (gone == TSTREAM_GONE_STREAM)
        t->st = NULL;
    if (gone == TSTREAM_GONE_BRIDGE)
        t->bridge = NULL;
    if (t->bridge)
        bridge_free(t->bridge);
    if (t->st)
        mux_stream_close(t->st);
    if (t->timer)
        event_free(t->timer);
    if (t->bev) {
        /* Out of the group now: bufferevent_free leaves it only a loop turn later. */
        bufferevent_remove_from_rate_limit_group(t->bev);
        bufferevent_free(t->bev);
    }
    if (t->fd >= 0)
        evutil_closesocket(t->fd);
    if (t->set) {
        TAILQ_REMOVE(&t->set->streams, t, link);
        t->set->nstreams--;
        if (t->state == TSTREAM_BRIDGED)
            t->set->nestablished--;
    }
    mapping_conn_end(&t->mc, t->state == TSTREAM_PENDING);
    free(t);
}

static struct tunnel_stream *tstream_of(struct mapping_conn *mc)
{
    return (struct tunnel_stream *)((char *)mc - offsetof(struct tunnel_stream, mc));
}

/* ---- bridged ---- */

static void tstream_on_bytes(size_t to_stream, size_t to_socket, void *arg)
{
    struct tunnel_stream *t = arg;
    mapping_conn_add_bytes(&t->mc, to_stream, to_socket);
    if (t->set) {
        t->set->bytes_out += to_stream;
        t->set->bytes_in += to_socket;
    }
}

static void tstream_on_bridge_close(const char *why, void *arg)
{
    tstream_end(arg, TSTREAM_GONE_BRIDGE);
}

static const struct bridge_hooks tstream_hooks = {
    .on_bytes = tstream_on_bytes,
    .on_close = tstream_on_bridge_close,
    .log_module = TSTREAM_MOD,
};

static bool tstream_unwatched_source_dead(struct mapping_conn *mc)
{
    struct tunnel_stream *t = tstream_of(mc);
    return t->bridge && bridge_unwatched_socket_dead(t->bridge);
}

static size_t tstream_held_bytes(struct mapping_conn *mc)
{
    struct tunnel_stream *t = tstream_of(mc);
    return t->bridge ? bridge_bytes_waiting(t->bridge) : 0;
}

/* A mapping update changed rate_limit: the bridged socket joins or leaves its group (and
 * so does a pending one reading ahead: the group must not go while it is a member). */
static void tstream_policy_changed(struct mapping_conn *mc)
{
    struct tunnel_stream *t = tstream_of(mc);
    struct bufferevent_rate_limit_group *g = mc->mapping->rl_group;
    int rc = 0;
    if (t->bridge)
        rc = bridge_set_rate_group(t->bridge, g);
    else if (t->bev)
        rc = g ? bufferevent_add_to_rate_limit_group(t->bev, g)
               : bufferevent_remove_from_rate_limit_group(t->bev);
    if (rc < 0)
        log_warn(TSTREAM_MOD, "port %d: cannot apply rate_limit to a live stream",
                 mc->mapping->rec.port);
}

/* The PROXY protocol header goes as the stream's first Data, before the bridge moves any
 * public byte, so the client passes it to the target unchanged (it needs no support).
 * What the tunnel cannot take now waits at the head of the socket's input, where the
 * bridge sends it first once the stream may send again. */
static int tstream_send_proxy_header(struct tunnel_stream *t, struct bufferevent *bev)
{
    unsigned char hdr[PROXY_HEADER_MAX];
    int n = mapping_conn_proxy_header(&t->mc, bufferevent_getfd(bev), hdr);
    if (n <= 0)
        return 0;
    struct evbuffer *buf = evbuffer_new();
    int rc = -1;
    if (buf && evbuffer_add(buf, hdr, (size_t)n) == 0 && mux_stream_write(t->st, buf) >= 0) {
        rc = 0;
        if (evbuffer_get_length(buf) > 0) {
            /* A socket bufferevent keeps its input's end frozen outside its own reads. */
            struct evbuffer *in = bufferevent_get_input(bev);
            evbuffer_unfreeze(in, 0);
            rc = evbuffer_add_buffer(in, buf);
            evbuffer_freeze(in, 0);
        }
    }
    evbuffer_free(buf);
    return rc;
}

/* pending -> bridged: the socket and the stream go to a bridge. With optimistic data the
 * socket is already a bufferevent and the PROXY header is already sent; what it read and
 * the stream could not take yet stays in its input, which the bridge sends first. */
static void tstream_bridge(struct tunnel_stream *t)
{
    struct event_base *base = event_get_base(t->timer);
    struct bufferevent *bev = t->bev;
    t->bev = NULL; /* the bridge's below, or freed here */
    if (!bev) {
        bev = bufferevent_socket_new(base, t->fd, BEV_OPT_CLOSE_ON_FREE);
        if (!bev) {
            tstream_end(t, TSTREAM_GONE_NONE);
            return;
        }
        t->fd = -1; /* bev's now */
        if (tstream_send_proxy_header(t, bev) < 0) {
            log_warn(TSTREAM_MOD, "port %d: cannot send the PROXY protocol header",
                     t->mc.mapping->rec.port);
            bufferevent_free(bev);
            tstream_end(t, TSTREAM_GONE_NONE);
            return;
        }
    }
    t->bridge = bridge_new(t->st, bev, &tstream_hooks, t);
    if (!t->bridge) {
        bufferevent_free(bev);
        tstream_end(t, TSTREAM_GONE_NONE);
        return;
    }
    t->st = NULL; /* the bridge's now */
    event_free(t->timer);
    t->timer = NULL;
    t->state = TSTREAM_BRIDGED;
    t->set->nestablished++;
    t->mc.policy_changed = tstream_policy_changed;
    t->mc.unwatched_source_dead = tstream_unwatched_source_dead;
    t->mc.held_bytes = tstream_held_bytes;
    if (t->mc.mapping->rl_group)
        tstream_policy_changed(&t->mc);
}

/* ---- pending ---- */

static void tstream_on_connect_response(struct mux_stream *st, uint8_t status, void *arg)
{
    struct tunnel_stream *t = arg;
    if (status == FRAME_STATUS_OK) {
        tstream_bridge(t);
        return;
    }
    static const char *const names[] = {"ok", "refused", "not allowed", "timeout"};
    log_debug(TSTREAM_MOD, "client \"%s\": port %d: target %s:%d %s", t->set->name,
              t->mc.mapping->rec.port, mapping_target_host(t->mc.mapping),
              t->mc.mapping->rec.target_port, status < 4 ? names[status] : "failed");
    mapping_dial_failed(t->mc.mapping, "client \"%s\" could not connect to %.64s:%d: %s%s",
                        t->set->name, mapping_target_host(t->mc.mapping),
                        t->mc.mapping->rec.target_port, status < 4 ? names[status] : "failed",
                        status == FRAME_STATUS_NOT_ALLOWED ? " by its --allow (status 2)" : "");
    tstream_end(t, TSTREAM_GONE_STREAM); /* a refusal ends the stream */
}

static void tstream_on_stream_close(struct mux_stream *st, enum mux_close_reason why, void *arg)
{
    tstream_end(arg, TSTREAM_GONE_STREAM);
}

/* Optimistic data: what the public socket sent while the client dials goes as the stream's
 * Data now, as far as the window and the tunnel's output allow. Reading pauses while
 * bytes wait in the input (on_writable resumes it), so at most one read beyond the window
 * is held here; the bridge picks up from there. */
static void tstream_early_pump(struct tunnel_stream *t)
{
    struct evbuffer *in = bufferevent_get_input(t->bev);
    if (evbuffer_get_length(in) > 0) {
        int n = mux_stream_write(t->st, in);
        if (n > 0)
            tstream_on_bytes((size_t)n, 0, t);
    }
    if (evbuffer_get_length(in) > 0 || t->bev_ended)
        bufferevent_disable(t->bev, EV_READ);
    else
        bufferevent_enable(t->bev, EV_READ);
}

static void tstream_early_read_cb(struct bufferevent *bev, void *arg)
{
    tstream_early_pump(arg);
}

/* EOF or an error from the public socket before the ConnectResponse: stop reading and
 * leave it to the bridge, which reads the socket again and sees its end (a FIN reads as
 * EOF again; after a reset, reads end in EOF or an error), as without optimistic data. */
static void tstream_early_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct tunnel_stream *t = arg;
    t->bev_ended = true;
    bufferevent_disable(bev, EV_READ);
}

static void tstream_on_early_writable(struct mux_stream *st, void *arg)
{
    struct tunnel_stream *t = arg;
    if (t->bev && evbuffer_get_length(bufferevent_get_input(t->bev)) > 0)
        tstream_early_pump(t);
}

static const struct mux_stream_callbacks tstream_pending_cb = {
    .on_connect_response = tstream_on_connect_response,
    .on_writable = tstream_on_early_writable,
    .on_close = tstream_on_stream_close,
};

/* A client-speaks-first peer has often spoken by the time we accept it: one read now puts
 * its first bytes in the same tunnel write as the ConnectRequest, not a loop turn later.
 * Nothing there, EOF or an error: libevent's own read finds it again. Not under a
 * rate limit, whose buckets only libevent's reads draw from. */
static void tstream_read_now(struct tunnel_stream *t)
{
    size_t room = mux_stream_send_room(t->st);
    if (room == 0)
        return;
    if (room > FRAME_MAX_DATA)
        room = FRAME_MAX_DATA;
    /* A socket bufferevent keeps its input's end frozen outside its own reads. */
    struct evbuffer *in = bufferevent_get_input(t->bev);
    evbuffer_unfreeze(in, 0);
    (void)sockread_into(in, bufferevent_getfd(t->bev), room); /* no FIONREAD first */
    evbuffer_freeze(in, 0);
}

/* The client takes optimistic data: the PROXY header goes right after the ConnectRequest,
 * then the public socket's first bytes, without waiting for the client's dial. */
static int tstream_read_ahead(struct tunnel_stream *t, struct event_base *base)
{
    t->bev = bufferevent_socket_new(base, t->fd, BEV_OPT_CLOSE_ON_FREE);
    if (!t->bev)
        return -1;
    t->fd = -1; /* bev's now */
    if (tstream_send_proxy_header(t, t->bev) < 0) {
        log_warn(TSTREAM_MOD, "port %d: cannot send the PROXY protocol header",
                 t->mc.mapping->rec.port);
        return -1;
    }
    bufferevent_setcb(t->bev, tstream_early_read_cb, NULL, tstream_early_event_cb, t);
    t->mc.policy_changed = tstream_policy_changed;
    if (t->mc.mapping->rl_group)
        tstream_policy_changed(&t->mc);
    else
        tstream_read_now(t);
    tstream_early_pump(t); /* sends what came, reads on (or waits for window) */
    return 0;
}

static void tstream_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tunnel_stream *t = arg;
    log_debug(TSTREAM_MOD, "client \"%s\": port %d: no ConnectResponse in time", t->set->name,
              t->mc.mapping->rec.port);
    mapping_dial_failed(t->mc.mapping, "client \"%s\" did not answer within "
                        "tunnel.connect_timeout", t->set->name);
    tstream_end(t, TSTREAM_GONE_NONE);
}

/* The mapping is removed or the server stops: close at once, whatever the state. */
static void tstream_abort(struct mapping_conn *mc)
{
    tstream_end(tstream_of(mc), TSTREAM_GONE_NONE);
}

/* ---- the set and the entry points ---- */

void tunnel_stream_set_init(struct tunnel_stream_set *set, const char *name)
{
    TAILQ_INIT(&set->streams);
    set->nstreams = set->nestablished = 0;
    set->bytes_in = set->bytes_out = 0;
    set->name = name;
}

void tunnel_stream_set_detach(struct tunnel_stream_set *set)
{
    struct tunnel_stream *t;
    while ((t = TAILQ_FIRST(&set->streams)) != NULL) {
        /* mux_session_free closed every stream: pending ones ended through on_close, so
         * only bridges delivering their last bytes remain. */
        TAILQ_REMOVE(&set->streams, t, link);
        t->set = NULL;
        t->state = TSTREAM_FLUSHING;
    }
    set->nstreams = set->nestablished = 0;
}

void tunnel_stream_refuse(struct mapping *m, evutil_socket_t fd)
{
    struct mapping_conn mc;
    mapping_conn_begin(m, &mc, NULL);
    mapping_conn_end(&mc, true);
    evutil_closesocket(fd);
}

void tunnel_stream_open(struct tunnel_stream_set *set, struct mux_session *mux,
                        struct event_base *base, struct mapping *m, evutil_socket_t fd,
                        int connect_timeout)
{
    struct tunnel_stream *t = calloc(1, sizeof(*t));
    if (!t) {
        tunnel_stream_refuse(m, fd);
        return;
    }
    t->fd = fd;
    t->state = TSTREAM_PENDING;
    mapping_conn_begin(m, &t->mc, tstream_abort);
    t->timer = evtimer_new(base, tstream_timeout_cb, t);
    t->st = t->timer ? mux_stream_open(mux, mapping_target_host(m),
                                       (uint16_t)m->rec.target_port, &tstream_pending_cb, t)
                     : NULL;
    if (!t->st) {
        tstream_end(t, TSTREAM_GONE_NONE);
        return;
    }
    t->set = set;
    TAILQ_INSERT_TAIL(&set->streams, t, link);
    set->nstreams++;
    if (mux_session_early_data(mux) && tstream_read_ahead(t, base) < 0) {
        tstream_end(t, TSTREAM_GONE_NONE);
        return;
    }
    struct timeval tv = {connect_timeout > 0 ? connect_timeout : 10, 0};
    evtimer_add(t->timer, &tv);
}

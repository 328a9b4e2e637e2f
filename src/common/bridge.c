/* One stream <-> one socket, with le-proxy's backpressure and nchan's half-close. */
#include "bridge.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "log.h"
#include "mux.h"
#include "relay_dir.h"
#include "sockread.h"

/* After the peer's Close, what is buffered for the socket gets this long to drain. */
#define BRIDGE_LINGER_SECONDS 60
/* A stream that sent this much socket -> tunnel is a bulk one: its further reads go
 * straight from the socket to the tunnel (mux_stream_splice), without a copy through user
 * space. Below it the copying path stays: one readv is cheaper than the splice, header
 * send and splice a zero-copy frame costs, for the small messages of request/response
 * traffic. */
#define BRIDGE_SPLICE_AFTER (256u * 1024u)
/* Zero-copy frames per read wake-up, so that one bulk stream leaves the loop to others. */
#define BRIDGE_SPLICE_BURST 16

struct bridge {
    struct mux_stream *st;        /* NULL once the stream is gone */
    struct bufferevent *bev;
    struct evbuffer_cb_entry *drain_cb;
    struct event *linger;
    /* Both in this allocation's tail: */
    struct event *rd;             /* reads the socket, unless rate-limited (see bridge_read) */
    struct event *flush;          /* write-through */
    struct bridge_hooks hooks;
    void *arg;
    enum relay_dir_state up;   /* socket -> stream: eof = the socket's FIN, fin_sent =
                                * ShutWrite went out */
    enum relay_dir_state down; /* stream -> socket: eof = ShutWrite received, fin_sent =
                                * shutdown(SHUT_WR) done */
    bool flushing;    /* stream gone: drain the output, then free */
    bool rate_limited;/* in a rate-limit group: only libevent's own (limited) reads */
    bool no_splice;   /* the session has no zero-copy transport after all */
    uint64_t to_stream, to_socket;
};

static void bridge_pump(struct bridge *b);

static void bridge_set_dir(struct bridge *b, enum relay_dir_state *dir,
                           enum relay_dir_state next)
{
    relay_dir_set(dir, next, b->hooks.log_module ? b->hooks.log_module : "bridge", "stream",
                  b->st ? (unsigned long)mux_stream_id(b->st) : 0ul,
                  dir == &b->up ? "socket->stream" : "stream->socket");
}

void bridge_set_nodelay(int fd)
{
    int one = 1;
    if (fd >= 0)
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

uint64_t bridge_bytes_to_stream(const struct bridge *b) { return b->to_stream; }

uint64_t bridge_bytes_to_socket(const struct bridge *b) { return b->to_socket; }

static void bridge_release(struct bridge *b)
{
    if (b->st) {
        mux_stream_close(b->st);
        b->st = NULL;
    }
    if (b->drain_cb)
        evbuffer_remove_cb_entry(bufferevent_get_output(b->bev), b->drain_cb);
    if (b->linger)
        event_free(b->linger);
    event_del(b->rd);
    event_del(b->flush);
    /* bufferevent_free leaves a rate-limit group only in its finalizer, a loop turn later,
     * and a group freed meanwhile (its mapping removed, its limit lifted) aborts libevent. */
    bufferevent_remove_from_rate_limit_group(b->bev);
    bufferevent_free(b->bev);
    free(b);
}

size_t bridge_bytes_waiting(const struct bridge *b)
{
    return evbuffer_get_length(bufferevent_get_output(b->bev));
}

void bridge_free(struct bridge *b)
{
    if (b)
        bridge_release(b);
}

/* Ends the bridge from inside one of its own callbacks: hook first, then free. */
static void bridge_finish(struct bridge *b, const char *why)
{
    if (b->hooks.on_close)
        b->hooks.on_close(why, b->arg);
    bridge_release(b);
}

/* Both directions done: nothing is in flight either way, so Close is plain cleanup. */
static bool bridge_check_done(struct bridge *b)
{
    if (b->up != RELAY_DIR_FIN_SENT || b->down != RELAY_DIR_FIN_SENT)
        return false;
    bridge_finish(b, "closed");
    return true;
}

/* Passes the peer's FIN on once everything before it reached the socket. */
static bool bridge_try_shutdown(struct bridge *b)
{
    if (b->down != RELAY_DIR_EOF || b->flushing)
        return false;
    if (evbuffer_get_length(bufferevent_get_output(b->bev)) > 0)
        return false;
    /* When the socket's own FIN was passed on already, the bridge ends right here and
     * its close sends this FIN: one syscall fewer per connection. */
    if (b->up != RELAY_DIR_FIN_SENT)
        shutdown(bufferevent_getfd(b->bev), SHUT_WR);
    bridge_set_dir(b, &b->down, RELAY_DIR_FIN_SENT);
    return bridge_check_done(b);
}

/* Reading. The socket is read by an event of ours (bridge_read) rather than by libevent's
 * bufferevent, whose every read asks the kernel for FIONREAD first: one syscall per read,
 * two per request/response exchange. A socket in a rate-limit group is the exception:
 * only libevent's reads draw from the group's buckets. */
static void bridge_read_on(struct bridge *b)
{
    if (b->rate_limited)
        bufferevent_enable(b->bev, EV_READ);
    else
        event_add(b->rd, NULL);
}

static void bridge_read_off(struct bridge *b)
{
    event_del(b->rd);
    bufferevent_disable(b->bev, EV_READ);
}

static void bridge_pump(struct bridge *b)
{
    if (!b->st || b->up == RELAY_DIR_FIN_SENT)
        return;
    struct evbuffer *in = bufferevent_get_input(b->bev);
    if (evbuffer_get_length(in) > 0) {
        int n = mux_stream_write(b->st, in);
        if (n < 0) {
            bridge_finish(b, "stream write failed");
            return;
        }
        if (n > 0) {
            b->to_stream += (uint64_t)n;
            if (b->hooks.on_bytes)
                b->hooks.on_bytes((size_t)n, 0, b->arg);
        }
    }
    if (evbuffer_get_length(in) > 0) {
        /* Window or tunnel output full: on_writable resumes us. */
        bridge_read_off(b);
        return;
    }
    if (b->up == RELAY_DIR_OPEN) {
        bridge_read_on(b);
        return;
    }
    bridge_set_dir(b, &b->up, RELAY_DIR_FIN_SENT);
    if (mux_stream_shut_write(b->st) != MUX_OK) {
        bridge_finish(b, "stream shut failed");
        return;
    }
    bridge_check_done(b);
}

/* libevent's read, for a socket in a rate-limit group (see bridge_read_on). */
static void bridge_read_cb(struct bufferevent *bev, void *arg) { bridge_pump(arg); }

/* A bulk stream's reads go straight from the socket to the tunnel, without a copy
 * through user space (see BRIDGE_SPLICE_AFTER). Returns false when this read should copy
 * instead. */
static bool bridge_read_splice(struct bridge *b, int fd)
{
    for (int i = 0; i < BRIDGE_SPLICE_BURST; i++) {
        size_t moved;
        switch (mux_stream_splice(b->st, fd, &moved)) {
        case MUX_SPLICE_MOVED:
            b->to_stream += moved;
            if (b->hooks.on_bytes)
                b->hooks.on_bytes(moved, 0, b->arg);
            continue;
        case MUX_SPLICE_AGAIN:
            return true;
        case MUX_SPLICE_BLOCKED:
            event_del(b->rd); /* on_writable: bridge_pump reads on */
            return true;
        case MUX_SPLICE_EOF:
            event_del(b->rd);
            bridge_set_dir(b, &b->up, RELAY_DIR_EOF);
            bridge_pump(b); /* ShutWrite */
            return true;
        case MUX_SPLICE_COPY:
            return false;
        case MUX_SPLICE_NONE:
            b->no_splice = true; /* not on a live session */
            return false;
        case MUX_SPLICE_ERROR:
            log_debug("bridge", "stream %u: socket error: %s", (unsigned)mux_stream_id(b->st),
                      evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
            bridge_finish(b, "socket error");
            return true;
        case MUX_SPLICE_STATE:
            bridge_finish(b, "stream write failed");
            return true;
        }
    }
    return true;
}

/* Least and most one read takes: the least so that a stream blocked on a full tunnel
 * output still writes (and so waits for on_writable), the most one tunnel read's worth. */
#define BRIDGE_READ_MIN 4096u
#define BRIDGE_READ_MAX (256u * 1024u)

static void bridge_read(evutil_socket_t fd, short what, void *arg)
{
    struct bridge *b = arg;
    struct evbuffer *in = bufferevent_get_input(b->bev);
    if (!b->st || b->up != RELAY_DIR_OPEN || evbuffer_get_length(in) > 0) {
        /* Bytes read ahead before the bridge go first; pump reads on when they went. */
        event_del(b->rd);
        bridge_pump(b);
        return;
    }
    if (!b->no_splice && b->to_stream >= BRIDGE_SPLICE_AFTER && mux_stream_can_splice(b->st) &&
        bridge_read_splice(b, (int)fd))
        return;
    /* No more than the stream may send now, so the input stays bounded by the window. */
    size_t want = mux_stream_send_room(b->st);
    want = want < BRIDGE_READ_MIN ? BRIDGE_READ_MIN : want > BRIDGE_READ_MAX ? BRIDGE_READ_MAX : want;
    /* A socket bufferevent keeps its input's end frozen outside its own reads. */
    evbuffer_unfreeze(in, 0);
    size_t total = 0, piece;
    ssize_t n;
    do {
        piece = want - total < SOCKREAD_CHUNK ? want - total : SOCKREAD_CHUNK;
        if ((n = sockread_into(in, (int)fd, piece)) > 0)
            total += (size_t)n;
    } while (n == (ssize_t)piece && total < want);
    evbuffer_freeze(in, 0);
    if (total > 0) {
        /* EV_CLOSED: the peer's FIN was queued behind these bytes when we woke, and the
         * read stopped short of what it asked for, so it took every byte before the FIN.
         * The end goes with them (Data and ShutWrite in one tunnel write) rather than
         * after a read that can only say 0. Otherwise an EOF or error behind the bytes
         * shows at the next read. */
        if ((what & EV_CLOSED) && n != (ssize_t)piece) {
            event_del(b->rd);
            bridge_set_dir(b, &b->up, RELAY_DIR_EOF);
        }
        bridge_pump(b);
        return;
    }
    if (n == 0) {
        event_del(b->rd);
        bridge_set_dir(b, &b->up, RELAY_DIR_EOF);
        bridge_pump(b);
        return;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return;
    log_debug("bridge", "stream %u: socket error: %s", (unsigned)mux_stream_id(b->st),
              evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
    bridge_finish(b, "socket error");
}

static void bridge_write_cb(struct bufferevent *bev, void *arg)
{
    struct bridge *b = arg;
    if (b->flushing) {
        if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
            bridge_finish(b, "closed by peer");
        return;
    }
    if (!bridge_try_shutdown(b) && evbuffer_get_length(bufferevent_get_output(bev)) == 0)
        bufferevent_disable(bev, EV_WRITE); /* the next bytes go out through bridge_flush_cb */
}

/* Write-through: bytes that land in an idle output are written from the loop's active
 * queue, right after the callback that added them (the tunnel's read, so all the frames
 * it brought are in), rather than by arming EPOLLOUT for a wake-up that only says the
 * socket has room, then disarming it: two epoll_ctl and a loop turn fewer per burst, and
 * per request on the request/response path. Only what the socket does not take waits
 * for the bufferevent's writing. */
static void bridge_flush_cb(evutil_socket_t fd, short what, void *arg)
{
    struct bridge *b = arg;
    struct evbuffer *out = bufferevent_get_output(b->bev);
    if (evbuffer_get_length(out) == 0 || (bufferevent_get_enabled(b->bev) & EV_WRITE))
        return;
    /* In a rate-limit group only libevent's own writes draw from the buckets: written
     * here, the bytes would pass the mapping's rate_limit by. */
    if (b->rate_limited) {
        bufferevent_enable(b->bev, EV_WRITE);
        return;
    }
    /* A socket bufferevent keeps its output's front frozen outside its own writes: this
     * is one. */
    evbuffer_unfreeze(out, 1);
    (void)evbuffer_write(out, bufferevent_getfd(b->bev));
    evbuffer_freeze(out, 1);
    if (evbuffer_get_length(out) > 0) {
        /* The socket is full (or failed: the bufferevent's write reports it). */
        bufferevent_enable(b->bev, EV_WRITE);
        return;
    }
    bridge_write_cb(b->bev, b); /* a FIN to pass on, a flushing bridge to end */
}

static void bridge_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct bridge *b = arg;
    /* libevent can report EOF and an error together (a FIN then a RST seen in one
     * wake-up): the error wins, or the stream would wait forever on a dead socket. */
    if (what & (BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)) {
        log_debug("bridge", "stream %u: socket %s: %s",
                  b->st ? (unsigned)mux_stream_id(b->st) : 0u,
                  what & BEV_EVENT_TIMEOUT ? "timeout" : "error",
                  evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
        bridge_finish(b, what & BEV_EVENT_TIMEOUT ? "socket timeout" : "socket error");
        return;
    }
    if (what & BEV_EVENT_EOF) {
        bridge_set_dir(b, &b->up, RELAY_DIR_EOF);
        if (b->flushing) {
            bridge_finish(b, "closed by peer");
            return;
        }
        bridge_pump(b);
    }
}

/* Counts what the socket really took and gives it back to the peer as window. The first
 * bytes for the socket turn writing on: enabled with an empty output, a socket
 * bufferevent arms EPOLLOUT, wakes up with nothing to write and disarms it (two epoll_ctl
 * and a wake-up per stream; bench/RESULTS.md, "Measurements behind the code"). */
static void bridge_drain_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info,
                            void *arg)
{
    struct bridge *b = arg;
    if (info->n_added > 0 && !(bufferevent_get_enabled(b->bev) & EV_WRITE)) {
        if (b->rate_limited) /* only libevent's writes are limited (bridge_flush_cb) */
            bufferevent_enable(b->bev, EV_WRITE);
        else
            event_active(b->flush, EV_WRITE, 0);
    }
    if (info->n_deleted == 0)
        return;
    b->to_socket += info->n_deleted;
    if (b->hooks.on_bytes)
        b->hooks.on_bytes(0, info->n_deleted, b->arg);
    if (b->st)
        mux_stream_consumed(b->st, info->n_deleted);
}

static void bridge_linger_cb(evutil_socket_t fd, short what, void *arg)
{
    bridge_finish(arg, "closed by peer (output not drained)");
}

static void bridge_block_free(const void *data, size_t len, void *arg) { free((void *)data); }

/* The peer used up the whole window and at least half of it still waits here: the reader
 * lags, and these bytes will sit. They are kept in one block of exactly their size rather
 * than in the chains they arrived in: a chain moved whole out of the tunnel's input keeps
 * the part of its buffer before the payload, and a stalled public reader pinned about 1.5
 * windows of heap that way. At most once per window (no more Data can come until the
 * reader drains half of it), so the copy costs at most twice what the reader took. */
static void bridge_on_data(struct mux_stream *st, size_t len, void *arg)
{
    struct bridge *b = arg;
    if (mux_stream_recv_window(st) != 0)
        return;
    struct evbuffer *out = bufferevent_get_output(b->bev);
    size_t have = evbuffer_get_length(out);
    if (have < MUX_INITIAL_WINDOW / 2 || evbuffer_peek(out, -1, NULL, NULL, 0) < 2)
        return;
    void *block = malloc(have);
    if (!block)
        return;
    /* The bytes only change chains: the drain callback must not count them as consumed.
     * A socket bufferevent keeps its output's front frozen outside its own write; we
     * put back exactly what we take, so lift the freeze for the duration. */
    evbuffer_cb_clear_flags(out, b->drain_cb, EVBUFFER_CB_ENABLED);
    evbuffer_unfreeze(out, 1);
    int rc = evbuffer_remove(out, block, have) == (int)have &&
                     evbuffer_add_reference(out, block, have, bridge_block_free, NULL) == 0
                 ? 0
                 : -1;
    evbuffer_freeze(out, 1);
    evbuffer_cb_set_flags(out, b->drain_cb, EVBUFFER_CB_ENABLED);
    if (rc != 0) {
        free(block);
        bridge_finish(b, "out of memory");
    }
}

static void bridge_on_writable(struct mux_stream *st, void *arg) { bridge_pump(arg); }

static void bridge_on_shut(struct mux_stream *st, void *arg)
{
    struct bridge *b = arg;
    bridge_set_dir(b, &b->down, RELAY_DIR_EOF);
    bridge_try_shutdown(b);
}

static void bridge_on_close(struct mux_stream *st, enum mux_close_reason why, void *arg)
{
    struct bridge *b = arg;
    b->st = NULL;
    struct evbuffer *out = bufferevent_get_output(b->bev);
    if (why == MUX_CLOSE_SESSION || evbuffer_get_length(out) == 0) {
        bridge_finish(b, why == MUX_CLOSE_SESSION ? "tunnel closed" : "closed by peer");
        return;
    }
    /* Deliver what the peer sent before its Close, then close. */
    b->flushing = true;
    bridge_read_off(b);
    struct timeval tv = {BRIDGE_LINGER_SECONDS, 0};
    b->linger = evtimer_new(bufferevent_get_base(b->bev), bridge_linger_cb, b);
    if (!b->linger || evtimer_add(b->linger, &tv) != 0)
        bridge_finish(b, "closed by peer");
}

static const struct mux_stream_callbacks bridge_stream_cb = {
    .on_data = bridge_on_data,
    .on_writable = bridge_on_writable,
    .on_shut = bridge_on_shut,
    .on_close = bridge_on_close,
};

bool bridge_unwatched_socket_dead(const struct bridge *b)
{
    bool reading = b->up == RELAY_DIR_OPEN && (event_pending(b->rd, EV_READ, NULL) ||
                                               (bufferevent_get_enabled(b->bev) & EV_READ));
    if (b->flushing || reading)
        return false;
    return relay_dir_source_dead(bufferevent_getfd(b->bev));
}

int bridge_set_rate_group(struct bridge *b, struct bufferevent_rate_limit_group *g)
{
    /* The reader changes hands (see bridge_read_on); the new one's registration first,
     * so that the socket's epoll interest never changes in between. */
    if (!g) {
        b->rate_limited = false;
        if (bufferevent_get_enabled(b->bev) & EV_READ) {
            event_add(b->rd, NULL);
            bufferevent_disable(b->bev, EV_READ);
        }
        return bufferevent_remove_from_rate_limit_group(b->bev);
    }
    b->rate_limited = true;
    if (evbuffer_get_length(bufferevent_get_output(b->bev)) > 0)
        bufferevent_enable(b->bev, EV_WRITE); /* what waits now goes out limited */
    if (event_pending(b->rd, EV_READ, NULL)) {
        bufferevent_enable(b->bev, EV_READ);
        event_del(b->rd);
    }
    return bufferevent_add_to_rate_limit_group(b->bev, g);
}

struct bridge *bridge_new(struct mux_stream *st, struct bufferevent *bev,
                          const struct bridge_hooks *hooks, void *arg)
{
    size_t head = (sizeof(struct bridge) + 15) & ~(size_t)15;
    size_t evsize = event_get_struct_event_size();
    struct bridge *b = calloc(1, head + 2 * evsize);
    if (!b)
        return NULL;
    b->rd = (struct event *)((unsigned char *)b + head);
    b->flush = (struct event *)((unsigned char *)b + head + evsize);
    /* EV_CLOSED (EPOLLRDHUP): a wake-up also says whether the peer's FIN is queued. Not
     * on a socket that a read-ahead bufferevent is reading: its registration has no
     * EPOLLRDHUP, and adding ours would cost an epoll_ctl per connection (see below). */
    short rd_events = EV_READ | EV_PERSIST;
    if (!(bufferevent_get_enabled(bev) & EV_READ))
        rd_events |= EV_CLOSED;
    event_assign(b->rd, bufferevent_get_base(bev), bufferevent_getfd(bev), rd_events,
                 bridge_read, b);
    event_assign(b->flush, bufferevent_get_base(bev), -1, 0, bridge_flush_cb, b);
    b->drain_cb = evbuffer_add_cb(bufferevent_get_output(bev), bridge_drain_cb, b);
    if (!b->drain_cb) {
        free(b);
        return NULL;
    }
    b->st = st;
    b->bev = bev;
    if (hooks)
        b->hooks = *hooks;
    b->arg = arg;
    /* The output holds at most one window: the peer sends no more until it drains. */
    bufferevent_setwatermark(bev, EV_WRITE, 0, 0);
    sockread_set_large_io(bev);
    bufferevent_setcb(bev, bridge_read_cb, bridge_write_cb, bridge_event_cb, b);
    mux_stream_set_callbacks(st, &bridge_stream_cb, b);
    bufferevent_disable(bev, EV_WRITE); /* bytes for it go out through bridge_flush_cb */
    /* Ours first, then libevent's off (a read-ahead bufferevent may have been reading):
     * the socket's epoll interest stays as it is, no epoll_ctl. Bytes it read ahead are
     * sent by the first bridge_read. */
    event_add(b->rd, NULL);
    bufferevent_disable(bev, EV_READ);
    if (evbuffer_get_length(bufferevent_get_input(bev)) > 0)
        event_active(b->rd, EV_READ, 0);
    mux_stream_set_sink(st, bufferevent_get_output(bev));
    return b;
}

/* The tunnel session: frames in from an evbuffer, frames out to an evbuffer. Streams,
 * windows and half-close in the manner of OpenSSH's channels; no sockets here. */
#include "mux.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/util.h>

#include "frame.h"

#define MUX_INITIAL_BUCKETS 64u
/* Room for any non-Data frame we encode: a ConnectRequest with a 255-byte host. */
#define MUX_CTRL_FRAME_MAX (FRAME_HEADER_LEN + 7 + FRAME_MAX_HOST)
#define MUX_DATA_HEADER_LEN (FRAME_HEADER_LEN + 4)

struct mux_stream {
    LIST_ENTRY(mux_stream) hash_link;     /* in session->buckets while not finished */
    TAILQ_ENTRY(mux_stream) blocked_link; /* waiting for room in the session output */
    TAILQ_ENTRY(mux_stream) splice_link;  /* waiting for the splice transport */
    TAILQ_ENTRY(mux_stream) gc_link;      /* finished, freed by the next GC pass */
    struct mux_session *s;
    uint32_t id;
    uint32_t send_window;    /* bytes we may still send */
    uint32_t recv_window;    /* bytes the peer may still send */
    uint32_t recv_consumed;  /* drained by the application, not yet given back */
    uint32_t recv_limit;     /* the window we grant; grows for fast streams */
    unsigned grow_streak;    /* WindowUpdates that found the peer starved, sink empty */
    uint64_t rx_total;       /* Data bytes received on the stream */
    uint64_t round_mark;     /* a window round ends when rx_total reaches this */
    uint64_t round_start_us; /* when that round's WindowUpdate went out */
    bool round_open;         /* a window round is being timed */
    bool starved;            /* the last timed round took about one round trip: the
                                window, not the sender, set the pace */
    struct evbuffer *rx;     /* own buffer, used while no sink is set */
    struct evbuffer *sink;
    struct mux_stream_callbacks cb;
    void *arg;
    bool attached;           /* the application holds a reference */
    bool opened;             /* ConnectResponse ok went through */
    bool local_shut, remote_shut;
    bool close_sent, close_recv;
    bool blocked;
    bool splice_waiting;
    bool finished;
};

LIST_HEAD(mux_bucket, mux_stream);
TAILQ_HEAD(mux_stream_list, mux_stream);

struct mux_session {
    enum mux_role role;
    struct evbuffer *out;
    struct mux_session_callbacks cb;
    void *arg;
    struct mux_bucket *buckets;
    size_t nbuckets;
    size_t nstreams;         /* in the table */
    size_t app_streams;      /* attached */
    struct mux_stream_list blocked;
    struct mux_stream_list splice_wait;
    struct mux_stream_list gc;
    const struct mux_splice_ops *splice;
    void *splice_arg;
    size_t buffer_limit;     /* what all window growth together may reach */
    size_t grown;            /* sum of (recv_limit - MUX_INITIAL_WINDOW) of live streams */
    uint32_t next_id;
    int depth;               /* > 0 while inside a call that may run callbacks */
    bool open;
    bool early_data;         /* optimistic data: see mux_session_set_early_data */
    bool freeing;
    int failed;
    char err[160];
    /* KeepAlive: our tokens start with nonce; one outstanding at a time. */
    uint8_t nonce[4];
    uint32_t ka_seq;
    uint8_t ka_token[MUX_KEEPALIVE_TOKEN_LEN];
    bool ka_pending;
    uint64_t ka_sent_ns;
    uint64_t ka_echoes;      /* echoes of our own tokens received (takeover probe) */
    double rtt_ms;
    /* Window auto-tuning: the shortest window round seen (about the round trip). */
    uint64_t round_min_us;
    bool round_seen;
    uint64_t (*clock_us)(void *arg);
    void *clock_arg;
};

static uint64_t mux_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int mux_fail(struct mux_session *s, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Records the first fatal error; later calls keep it. */
static int mux_fail(struct mux_session *s, int rc, const char *fmt, ...)
{
    if (s->failed)
        return s->failed;
    s->failed = rc;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err, sizeof(s->err), fmt, ap);
    va_end(ap);
    return rc;
}

/* ---- stream table ---- */

static struct mux_bucket *mux_bucket_of(struct mux_session *s, uint32_t id)
{
    /* Fibonacci hashing spreads sequential ids over the table. */
    uint32_t h = id * 2654435761u;
    return &s->buckets[h & (s->nbuckets - 1)];
}

static struct mux_stream *mux_lookup(struct mux_session *s, uint32_t id)
{
    struct mux_stream *st;
    LIST_FOREACH(st, mux_bucket_of(s, id), hash_link) {
        if (st->id == id)
            return st;
    }
    return NULL;
}

static int mux_table_grow(struct mux_session *s)
{
    size_t old_n = s->nbuckets;
    struct mux_bucket *old = s->buckets;
    struct mux_bucket *nb = calloc(old_n * 2, sizeof(*nb));
    if (!nb)
        return MUX_E_NOMEM;
    s->buckets = nb;
    s->nbuckets = old_n * 2;
    for (size_t i = 0; i < old_n; i++) {
        struct mux_stream *st;
        while ((st = LIST_FIRST(&old[i])) != NULL) {
            LIST_REMOVE(st, hash_link);
            LIST_INSERT_HEAD(mux_bucket_of(s, st->id), st, hash_link);
        }
    }
    free(old);
    return MUX_OK;
}

static struct mux_stream *mux_stream_new(struct mux_session *s, uint32_t id)
{
    if (s->nstreams >= s->nbuckets && mux_table_grow(s) != MUX_OK)
        return NULL;
    struct mux_stream *st = calloc(1, sizeof(*st));
    if (!st)
        return NULL;
    st->s = s;
    st->id = id;
    st->send_window = MUX_INITIAL_WINDOW;
    st->recv_window = MUX_INITIAL_WINDOW;
    st->recv_limit = MUX_INITIAL_WINDOW;
    st->attached = true;
    LIST_INSERT_HEAD(mux_bucket_of(s, id), st, hash_link);
    s->nstreams++;
    s->app_streams++;
    return st;
}

static void mux_unblock(struct mux_stream *st)
{
    if (st->blocked) {
        TAILQ_REMOVE(&st->s->blocked, st, blocked_link);
        st->blocked = false;
    }
    if (st->splice_waiting) {
        TAILQ_REMOVE(&st->s->splice_wait, st, splice_link);
        st->splice_waiting = false;
    }
}

/* Ends the application's reference (no callbacks). */
static void mux_detach(struct mux_stream *st)
{
    if (!st->attached)
        return;
    st->attached = false;
    memset(&st->cb, 0, sizeof(st->cb));
    st->arg = NULL;
    st->s->app_streams--;
    mux_unblock(st);
}

/* Close went both ways: out of the table now, freed by the GC pass. */
static void mux_finish(struct mux_stream *st)
{
    struct mux_session *s = st->s;
    if (st->finished || s->freeing)
        return;
    mux_detach(st);
    st->finished = true;
    /* No more Data comes: its growth goes back to the session's budget. */
    s->grown -= st->recv_limit - MUX_INITIAL_WINDOW;
    LIST_REMOVE(st, hash_link);
    s->nstreams--;
    TAILQ_INSERT_TAIL(&s->gc, st, gc_link);
}

static void mux_stream_free(struct mux_stream *st)
{
    if (st->rx)
        evbuffer_free(st->rx);
    free(st);
}

/* Frees finished streams once no callback can still be using them. */
static void mux_gc(struct mux_session *s)
{
    if (s->depth > 0)
        return;
    struct mux_stream *st;
    while ((st = TAILQ_FIRST(&s->gc)) != NULL) {
        TAILQ_REMOVE(&s->gc, st, gc_link);
        mux_stream_free(st);
    }
}

/* ---- session ---- */

struct mux_session *mux_session_new(enum mux_role role, struct evbuffer *out,
                                    const struct mux_session_callbacks *cb, void *arg)
{
    struct mux_session *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->buckets = calloc(MUX_INITIAL_BUCKETS, sizeof(*s->buckets));
    if (!s->buckets) {
        free(s);
        return NULL;
    }
    s->nbuckets = MUX_INITIAL_BUCKETS;
    s->role = role;
    s->out = out;
    if (cb)
        s->cb = *cb;
    s->arg = arg;
    s->next_id = 1;
    s->buffer_limit = MUX_SESSION_BUFFER_LIMIT;
    TAILQ_INIT(&s->blocked);
    TAILQ_INIT(&s->splice_wait);
    TAILQ_INIT(&s->gc);
    evutil_secure_rng_get_bytes(s->nonce, sizeof(s->nonce));
    return s;
}

void mux_session_set_clock(struct mux_session *s, uint64_t (*now_us)(void *arg), void *arg)
{
    s->clock_us = now_us;
    s->clock_arg = arg;
}

void mux_session_set_buffer_limit(struct mux_session *s, size_t bytes)
{
    s->buffer_limit = bytes;
}

size_t mux_session_buffer_grown(const struct mux_session *s) { return s->grown; }

void mux_session_free(struct mux_session *s)
{
    if (!s)
        return;
    struct mux_stream *st;
    /* Move every stream to the GC list first, so callbacks cannot change the table. */
    for (size_t i = 0; i < s->nbuckets; i++) {
        while ((st = LIST_FIRST(&s->buckets[i])) != NULL) {
            LIST_REMOVE(st, hash_link);
            st->finished = true;
            TAILQ_INSERT_TAIL(&s->gc, st, gc_link);
        }
    }
    s->freeing = true;
    TAILQ_FOREACH(st, &s->gc, gc_link) {
        if (!st->attached)
            continue;
        struct mux_stream_callbacks cb = st->cb;
        void *arg = st->arg;
        mux_detach(st);
        if (cb.on_close)
            cb.on_close(st, MUX_CLOSE_SESSION, arg);
    }
    s->depth = 0;
    mux_gc(s);
    free(s->buckets);
    free(s);
}

void mux_session_set_open(struct mux_session *s) { s->open = true; }

void mux_session_set_early_data(struct mux_session *s) { s->early_data = true; }

bool mux_session_early_data(const struct mux_session *s) { return s->early_data; }

bool mux_session_is_open(const struct mux_session *s) { return s->open; }

const char *mux_session_error(const struct mux_session *s) { return s->err; }

double mux_session_rtt_ms(const struct mux_session *s) { return s->rtt_ms; }

size_t mux_session_stream_count(const struct mux_session *s) { return s->app_streams; }

size_t mux_session_closing_count(const struct mux_session *s)
{
    return s->nstreams - s->app_streams;
}

/* Appends an encoded control frame; n is the encoder's result. */
static int mux_emit(struct mux_session *s, const uint8_t *buf, int n)
{
    if (n < 0)
        return MUX_E_STATE;
    if (s->failed || s->freeing)
        return MUX_E_STATE;
    if (evbuffer_add(s->out, buf, (size_t)n) != 0)
        return mux_fail(s, MUX_E_NOMEM, "out of memory");
    return MUX_OK;
}

int mux_session_send_json(struct mux_session *s, uint8_t type, const char *json, size_t len)
{
    /* Rare (once per session): a heap buffer keeps the codec the only judge of validity. */
    size_t cap = FRAME_HEADER_LEN + len;
    uint8_t *buf = malloc(cap);
    if (!buf)
        return mux_fail(s, MUX_E_NOMEM, "out of memory");
    int rc = mux_emit(s, buf, frame_encode_json(buf, cap, type, json, len));
    free(buf);
    return rc;
}

uint64_t mux_session_keepalive_echoes(const struct mux_session *s) { return s->ka_echoes; }

int mux_session_send_keepalive(struct mux_session *s)
{
    uint8_t buf[FRAME_HEADER_LEN + MUX_KEEPALIVE_TOKEN_LEN];
    uint32_t seq = ++s->ka_seq;
    memcpy(s->ka_token, s->nonce, 4);
    s->ka_token[4] = (uint8_t)(seq >> 24);
    s->ka_token[5] = (uint8_t)(seq >> 16);
    s->ka_token[6] = (uint8_t)(seq >> 8);
    s->ka_token[7] = (uint8_t)seq;
    int rc = mux_emit(s, buf, frame_encode_keepalive(buf, sizeof(buf), s->ka_token));
    if (rc == MUX_OK) {
        s->ka_pending = true;
        s->ka_sent_ns = s->clock_us ? s->clock_us(s->clock_arg) * 1000u : mux_now_ns();
    }
    return rc;
}

void mux_session_output_drained(struct mux_session *s)
{
    s->depth++;
    /* Round robin: a stream that fills the output again goes to the back of the list. */
    while (!TAILQ_EMPTY(&s->blocked) && !s->failed &&
           evbuffer_get_length(s->out) < MUX_OUT_SOFT_LIMIT) {
        struct mux_stream *st = TAILQ_FIRST(&s->blocked);
        mux_unblock(st);
        if (st->attached && st->cb.on_writable)
            st->cb.on_writable(st, st->arg);
    }
    s->depth--;
    mux_gc(s);
}

void mux_session_set_splice(struct mux_session *s, const struct mux_splice_ops *ops,
                            void *arg)
{
    s->splice = ops;
    s->splice_arg = arg;
}

void mux_session_splice_ready(struct mux_session *s)
{
    s->depth++;
    /* A woken stream that finds the transport busy again waits at the back; the loop
     * ends as soon as the transport is busy, so it cannot spin. */
    while (!TAILQ_EMPTY(&s->splice_wait) && !s->failed && s->splice &&
           s->splice->ready(s->splice_arg)) {
        struct mux_stream *st = TAILQ_FIRST(&s->splice_wait);
        TAILQ_REMOVE(&s->splice_wait, st, splice_link);
        st->splice_waiting = false;
        if (st->attached && st->cb.on_writable)
            st->cb.on_writable(st, st->arg);
    }
    s->depth--;
    mux_gc(s);
}

/* ---- input ---- */

static int mux_on_keepalive(struct mux_session *s, const struct frame *f)
{
    if (f->data_len != MUX_KEEPALIVE_TOKEN_LEN)
        return MUX_OK;
    if (memcmp(f->data, s->nonce, 4) == 0) {
        /* Our own token coming back; a stale one (superseded) is dropped, never echoed,
         * or two peers would bounce it forever. */
        if (s->ka_pending && memcmp(f->data, s->ka_token, MUX_KEEPALIVE_TOKEN_LEN) == 0) {
            /* Whole microseconds, rounded up: finer is noise (and 0.19198000000000001
             * is what the API showed), and a sample is never 0, which reads "none yet". */
            uint64_t now = s->clock_us ? s->clock_us(s->clock_arg) * 1000u : mux_now_ns();
            uint64_t us = (now - s->ka_sent_ns + 999) / 1000;
            s->rtt_ms = (double)(us > 0 ? us : 1) / 1e3;
            s->ka_pending = false;
            s->ka_echoes++;
        }
        return MUX_OK;
    }
    uint8_t buf[FRAME_HEADER_LEN + MUX_KEEPALIVE_TOKEN_LEN];
    return mux_emit(s, buf, frame_encode_keepalive(buf, sizeof(buf), f->data));
}

static int mux_on_json(struct mux_session *s, const struct frame *f)
{
    uint8_t want = s->role == MUX_ROLE_SERVER ? FRAME_HELLO : FRAME_HELLO_RESPONSE;
    if (f->type != want)
        return mux_fail(s, MUX_E_PROTOCOL, "unexpected %s frame",
                        f->type == FRAME_HELLO ? "Hello" : "HelloResponse");
    if (!s->cb.on_json)
        return MUX_OK;
    int rc = s->cb.on_json(s, f->type, (const char *)f->data, f->data_len, s->arg);
    if (rc < 0)
        return mux_fail(s, MUX_E_PROTOCOL, "bad %s",
                        f->type == FRAME_HELLO ? "Hello" : "HelloResponse");
    return rc > 0 ? MUX_STOPPED : MUX_OK;
}

/* A Notice goes server -> client only, after the Hello (mux_dispatch checked that). */
static int mux_on_notice(struct mux_session *s, const struct frame *f)
{
    if (s->role != MUX_ROLE_CLIENT)
        return mux_fail(s, MUX_E_PROTOCOL, "Notice sent to the server");
    if (!s->cb.on_json)
        return MUX_OK;
    int rc = s->cb.on_json(s, f->type, (const char *)f->data, f->data_len, s->arg);
    if (rc < 0)
        return mux_fail(s, MUX_E_PROTOCOL, "bad Notice");
    return rc > 0 ? MUX_STOPPED : MUX_OK;
}

static int mux_on_connect_request(struct mux_session *s, const struct frame *f)
{
    if (s->role != MUX_ROLE_CLIENT)
        return mux_fail(s, MUX_E_PROTOCOL, "ConnectRequest sent to the server");
    if (mux_lookup(s, f->conn_id))
        return mux_fail(s, MUX_E_PROTOCOL, "ConnectRequest for stream %u in use",
                        (unsigned)f->conn_id);
    char host[FRAME_MAX_HOST + 1] = "127.0.0.1";
    if (f->host) {
        memcpy(host, f->host, f->host_len);
        host[f->host_len] = '\0';
    }
    struct mux_stream *st = mux_stream_new(s, f->conn_id);
    if (!st)
        return mux_fail(s, MUX_E_NOMEM, "out of memory");
    if (s->cb.on_connect_request)
        s->cb.on_connect_request(s, st, host, f->port, s->arg);
    else
        mux_stream_respond(st, FRAME_STATUS_REFUSED);
    return MUX_OK;
}

static int mux_on_connect_response(struct mux_session *s, const struct frame *f)
{
    if (s->role != MUX_ROLE_SERVER)
        return mux_fail(s, MUX_E_PROTOCOL, "ConnectResponse sent to the client");
    struct mux_stream *st = mux_lookup(s, f->conn_id);
    if (!st || st->opened)
        return mux_fail(s, MUX_E_PROTOCOL, "unexpected ConnectResponse for stream %u",
                        (unsigned)f->conn_id);
    if (f->status == FRAME_STATUS_OK) {
        /* Open even when we gave up already: what the peer sends before our Close reaches
         * it (a banner, its ShutWrite) is then dropped with the stream, not taken for a
         * frame on an unopened stream, which would end the whole session. */
        st->opened = true;
        if (st->close_sent)
            return MUX_OK; /* the peer answers our Close */
        if (st->cb.on_connect_response)
            st->cb.on_connect_response(st, f->status, st->arg);
        return MUX_OK;
    }
    /* A refusal ends the stream on both sides without Close frames. */
    struct mux_stream_callbacks cb = st->cb;
    void *arg = st->arg;
    bool attached = st->attached;
    st->close_sent = st->close_recv = true;
    mux_finish(st);
    if (attached && cb.on_connect_response)
        cb.on_connect_response(st, f->status, arg);
    return MUX_OK;
}

static int mux_on_close(struct mux_session *s, const struct frame *f)
{
    struct mux_stream *st = mux_lookup(s, f->conn_id);
    if (!st)
        return MUX_OK; /* our refusal crossed the peer's Close: tolerated */
    if (st->close_recv)
        return mux_fail(s, MUX_E_PROTOCOL, "second Close for stream %u", (unsigned)st->id);
    st->close_recv = true;
    if (st->attached) {
        struct mux_stream_callbacks cb = st->cb;
        void *arg = st->arg;
        mux_detach(st);
        if (cb.on_close)
            cb.on_close(st, MUX_CLOSE_PEER, arg);
    }
    if (!st->close_sent) {
        uint8_t buf[FRAME_HEADER_LEN + 4];
        st->close_sent = true;
        mux_emit(s, buf, frame_encode_close(buf, sizeof(buf), st->id));
    }
    mux_finish(st);
    return MUX_OK;
}

/* Looks up the stream a WindowUpdate/ShutWrite/Data names; it must be open. */
static struct mux_stream *mux_open_stream_for(struct mux_session *s, const struct frame *f,
                                              const char *what)
{
    struct mux_stream *st = mux_lookup(s, f->conn_id);
    if (!st || !st->opened) {
        mux_fail(s, MUX_E_PROTOCOL, "%s for %s stream %u", what, st ? "unopened" : "unknown",
                 (unsigned)f->conn_id);
        return NULL;
    }
    return st;
}

static int mux_on_window_update(struct mux_session *s, const struct frame *f)
{
    struct mux_stream *st = mux_open_stream_for(s, f, "WindowUpdate");
    if (!st)
        return s->failed;
    if ((uint64_t)st->send_window + f->increment > MUX_MAX_WINDOW)
        return mux_fail(s, MUX_E_PROTOCOL, "window overflow on stream %u", (unsigned)st->id);
    st->send_window += f->increment;
    if (st->attached && !st->close_sent && st->cb.on_writable)
        st->cb.on_writable(st, st->arg);
    return MUX_OK;
}

static int mux_on_shut_write(struct mux_session *s, const struct frame *f)
{
    struct mux_stream *st = mux_open_stream_for(s, f, "ShutWrite");
    if (!st)
        return s->failed;
    if (st->remote_shut)
        return mux_fail(s, MUX_E_PROTOCOL, "second ShutWrite for stream %u", (unsigned)st->id);
    st->remote_shut = true;
    if (st->attached && st->cb.on_shut)
        st->cb.on_shut(st, st->arg);
    return MUX_OK;
}

static int mux_dispatch(struct mux_session *s, const struct frame *f)
{
    bool json = f->type == FRAME_HELLO || f->type == FRAME_HELLO_RESPONSE;
    if (!s->open && !json)
        return mux_fail(s, MUX_E_PROTOCOL, "frame type %u before Hello", (unsigned)f->type);
    switch (f->type) {
    case FRAME_CONNECT_REQUEST:
        return mux_on_connect_request(s, f);
    case FRAME_CONNECT_RESPONSE:
        return mux_on_connect_response(s, f);
    case FRAME_CLOSE:
        return mux_on_close(s, f);
    case FRAME_KEEPALIVE:
        return mux_on_keepalive(s, f);
    case FRAME_HELLO:
    case FRAME_HELLO_RESPONSE:
        return mux_on_json(s, f);
    case FRAME_WINDOW_UPDATE:
        return mux_on_window_update(s, f);
    case FRAME_SHUT_WRITE:
        return mux_on_shut_write(s, f);
    case FRAME_NOTICE:
        return mux_on_notice(s, f);
    default:
        return mux_fail(s, MUX_E_FRAME, "unknown type");
    }
}

/* A window round within twice the shortest one (plus this, for loopback's jitter of
 * microseconds) counts as paced by the window. */
#define MUX_ROUND_SLACK_US 1000u

static uint64_t mux_clock_us(struct mux_session *s)
{
    return s->clock_us ? s->clock_us(s->clock_arg) : mux_now_ns() / 1000u;
}

/* The shortest window round seen, or the KeepAlive round trip when that is shorter (a
 * stream that never used its whole window has only long rounds to show). */
static uint64_t mux_rtt_estimate_us(const struct mux_session *s)
{
    uint64_t est = s->round_min_us;
    if (s->rtt_ms > 0) {
        uint64_t ka = (uint64_t)(s->rtt_ms * 1000.0);
        if (ka < est)
            est = ka;
    }
    return est;
}

/* The peer has now sent everything our WindowUpdate at round_start_us allowed. A peer
 * that sends whenever it has credit does so one round trip after the update (the update
 * crosses, the Data crosses back): that round is the shortest, about the round trip.
 * A peer with credit to spare takes longer (its sender, not the window, sets the pace).
 * So a round within twice the shortest (or twice the KeepAlive round trip, once the
 * heartbeat measured one) says the window held the stream back. */
static void mux_round_end(struct mux_stream *st)
{
    struct mux_session *s = st->s;
    uint64_t d = mux_clock_us(s) - st->round_start_us;
    st->round_open = false;
    if (!s->round_seen || d < s->round_min_us) {
        s->round_min_us = d;
        s->round_seen = true;
    }
    if (d <= 2 * mux_rtt_estimate_us(s) + MUX_ROUND_SLACK_US)
        st->starved = true;
}

/* Copies below this go through libevent (into the sink's last chain where it has room). */
#define MUX_EXACT_MIN 4096u

static void mux_block_free(const void *data, size_t len, void *arg) { free((void *)data); }

/* Moves n bytes from in to dst. Whole chains move without a copy; the rest (the part of a
 * chain that also holds the next frame) is copied into a block of exactly its size:
 * libevent would copy it into a chain rounded up to a power of two (a 40 KiB tail takes
 * 64 KiB, a 65 KiB one 128 KiB), heap that a stalled reader's bytes then pin. */
static int mux_move(struct evbuffer *in, struct evbuffer *dst, size_t n)
{
    while (n > 0) {
        struct evbuffer_iovec v;
        /* An empty first chain (left by a read that committed nothing) is copied past,
         * never "moved" for zero bytes forever. */
        if (evbuffer_peek(in, -1, NULL, &v, 1) >= 1 && v.iov_len > 0 && v.iov_len <= n) {
            if (evbuffer_remove_buffer(in, dst, v.iov_len) != (int)v.iov_len)
                return -1;
            n -= v.iov_len;
            continue;
        }
        if (n < MUX_EXACT_MIN)
            return evbuffer_remove_buffer(in, dst, n) == (int)n ? 0 : -1;
        void *block = malloc(n);
        if (!block)
            return -1;
        if (evbuffer_remove(in, block, n) != (int)n ||
            evbuffer_add_reference(dst, block, n, mux_block_free, NULL) != 0) {
            free(block);
            return -1;
        }
        return 0;
    }
    return 0;
}

/* Data moves from in to the stream's sink without a copy where the chains allow it. */
static int mux_input_data(struct mux_session *s, struct evbuffer *in, uint32_t length)
{
    uint8_t hdr[MUX_DATA_HEADER_LEN];
    struct frame f;
    if (length < 4 || length - 4 > FRAME_MAX_DATA)
        return mux_fail(s, MUX_E_FRAME, "%s", frame_result_name(FRAME_E_PAYLOAD));
    evbuffer_copyout(in, hdr, sizeof(hdr));
    enum frame_result r = frame_payload_decode(FRAME_DATA, hdr + FRAME_HEADER_LEN, 4, &f);
    if (r != FRAME_OK)
        return mux_fail(s, MUX_E_FRAME, "%s", frame_result_name(r));
    if (!s->open)
        return mux_fail(s, MUX_E_PROTOCOL, "Data before Hello");
    struct mux_stream *st;
    if (s->early_data && s->role == MUX_ROLE_CLIENT) {
        /* Optimistic data: Data may come before our ConnectResponse (held in rx until
         * the application sets a sink), and Data for a stream we no longer know may be
         * the server's early Data crossing our refusal: dropped, as a crossed Close is.
         * Its window is no concern: the stream is gone on both sides. */
        st = mux_lookup(s, f.conn_id);
        if (!st)
            return evbuffer_drain(in, FRAME_HEADER_LEN + (size_t)length) == 0
                       ? MUX_OK
                       : mux_fail(s, MUX_E_NOMEM, "drain failed");
    } else if (!(st = mux_open_stream_for(s, &f, "Data"))) {
        return s->failed;
    }
    size_t n = length - 4;
    if (st->remote_shut)
        return mux_fail(s, MUX_E_PROTOCOL, "Data after ShutWrite on stream %u", (unsigned)st->id);
    if (n > st->recv_window)
        return mux_fail(s, MUX_E_PROTOCOL, "Data beyond the window on stream %u",
                        (unsigned)st->id);
    st->recv_window -= (uint32_t)n;
    st->rx_total += n;
    if (st->round_open && st->rx_total >= st->round_mark)
        mux_round_end(st);
    evbuffer_drain(in, sizeof(hdr));
    if (st->close_sent || !st->attached)
        return evbuffer_drain(in, n) == 0 ? MUX_OK : mux_fail(s, MUX_E_NOMEM, "drain failed");
    struct evbuffer *dst = st->sink ? st->sink : st->rx;
    if (!dst && !(dst = st->rx = evbuffer_new()))
        return mux_fail(s, MUX_E_NOMEM, "out of memory");
    if (n && mux_move(in, dst, n) != 0)
        return mux_fail(s, MUX_E_NOMEM, "out of memory");
    if (n && st->cb.on_data)
        st->cb.on_data(st, n, st->arg);
    return MUX_OK;
}

/* mux_input_one's results besides errors. */
enum { MUX_IN_NEED_MORE = 0, MUX_IN_HANDLED = 1, MUX_IN_STOP = 2 };

/* Handles the frame at the front of in: MUX_IN_*, or a negative error. */
static int mux_input_one(struct mux_session *s, struct evbuffer *in)
{
    uint8_t raw[FRAME_HEADER_LEN];
    struct frame_header fh;
    size_t avail = evbuffer_get_length(in);
    if (avail < FRAME_HEADER_LEN)
        return MUX_IN_NEED_MORE;
    evbuffer_copyout(in, raw, sizeof(raw));
    enum frame_result r = frame_header_decode(raw, &fh);
    if (r != FRAME_OK)
        return mux_fail(s, MUX_E_FRAME, "%s", frame_result_name(r));
    /* Before Hello only a small JSON frame may come: judge the header alone, so an
     * unauthenticated peer cannot make us buffer a 64 KiB frame it never finishes. */
    if (!s->open && fh.length > FRAME_MAX_JSON)
        return mux_fail(s, MUX_E_PROTOCOL, "frame of %u bytes before Hello (at most %u)",
                        (unsigned)fh.length, (unsigned)FRAME_MAX_JSON);
    if (avail - FRAME_HEADER_LEN < fh.length)
        return MUX_IN_NEED_MORE;
    int rc;
    if (fh.type == FRAME_DATA) {
        rc = mux_input_data(s, in, fh.length);
    } else {
        size_t total = FRAME_HEADER_LEN + (size_t)fh.length;
        const uint8_t *p = evbuffer_pullup(in, (ev_ssize_t)total);
        if (!p)
            return mux_fail(s, MUX_E_NOMEM, "out of memory");
        struct frame f;
        r = frame_payload_decode(fh.type, p + FRAME_HEADER_LEN, fh.length, &f);
        if (r != FRAME_OK)
            return mux_fail(s, MUX_E_FRAME, "%s", frame_result_name(r));
        rc = mux_dispatch(s, &f);
        evbuffer_drain(in, total);
    }
    if (s->failed)
        return s->failed;
    if (rc < 0)
        return rc;
    return rc == MUX_STOPPED ? MUX_IN_STOP : MUX_IN_HANDLED;
}

int mux_session_input(struct mux_session *s, struct evbuffer *in)
{
    if (s->failed)
        return s->failed;
    s->depth++;
    int rc;
    while ((rc = mux_input_one(s, in)) == MUX_IN_HANDLED)
        ;
    s->depth--;
    mux_gc(s);
    if (s->failed)
        return s->failed;
    if (rc < 0)
        return rc;
    return rc == MUX_IN_STOP ? MUX_STOPPED : MUX_OK;
}

/* ---- streams ---- */

static uint32_t mux_alloc_id(struct mux_session *s)
{
    /* ids wrap after 2^32 - 1; skip 0 and ids still in the table. */
    for (size_t tries = 0; tries <= s->nstreams; tries++) {
        uint32_t id = s->next_id++;
        if (id == 0)
            id = s->next_id++;
        if (!mux_lookup(s, id))
            return id;
    }
    return 0;
}

struct mux_stream *mux_stream_open(struct mux_session *s, const char *host, uint16_t port,
                                   const struct mux_stream_callbacks *cb, void *arg)
{
    uint8_t buf[MUX_CTRL_FRAME_MAX];
    if (s->role != MUX_ROLE_SERVER || !s->open || s->failed || s->freeing)
        return NULL;
    uint32_t id = mux_alloc_id(s);
    if (id == 0)
        return NULL;
    int n = frame_encode_connect_request(buf, sizeof(buf), id, port, host);
    if (n < 0)
        return NULL;
    struct mux_stream *st = mux_stream_new(s, id);
    if (!st)
        return NULL;
    if (cb)
        st->cb = *cb;
    st->arg = arg;
    if (mux_emit(s, buf, n) != MUX_OK) {
        st->close_sent = st->close_recv = true;
        mux_finish(st);
        mux_gc(s);
        return NULL;
    }
    return st;
}

int mux_stream_respond(struct mux_stream *st, uint8_t status)
{
    struct mux_session *s = st->s;
    uint8_t buf[FRAME_HEADER_LEN + 5];
    if (s->role != MUX_ROLE_CLIENT || !st->attached || st->opened || st->close_sent)
        return MUX_E_STATE;
    int rc = mux_emit(s, buf, frame_encode_connect_response(buf, sizeof(buf), st->id, status));
    if (rc == MUX_OK && status == FRAME_STATUS_OK) {
        st->opened = true;
        return MUX_OK;
    }
    /* A refusal ends the stream here; the peer frees its side on receipt. */
    st->close_sent = st->close_recv = true;
    mux_finish(st);
    mux_gc(s);
    return rc;
}

void mux_stream_set_callbacks(struct mux_stream *st, const struct mux_stream_callbacks *cb,
                              void *arg)
{
    if (!st->attached)
        return;
    if (cb)
        st->cb = *cb;
    else
        memset(&st->cb, 0, sizeof(st->cb));
    st->arg = arg;
}

void mux_stream_set_sink(struct mux_stream *st, struct evbuffer *sink)
{
    if (sink && st->rx && evbuffer_get_length(st->rx) > 0)
        evbuffer_add_buffer(sink, st->rx);
    st->sink = sink;
}

struct evbuffer *mux_stream_sink(struct mux_stream *st)
{
    if (st->sink)
        return st->sink;
    if (!st->rx)
        st->rx = evbuffer_new();
    return st->rx;
}

size_t mux_stream_held(const struct mux_stream *st)
{
    return !st->sink && st->rx ? evbuffer_get_length(st->rx) : 0;
}

uint32_t mux_stream_id(const struct mux_stream *st) { return st->id; }

struct mux_session *mux_stream_session(const struct mux_stream *st) { return st->s; }

uint32_t mux_stream_send_window(const struct mux_stream *st) { return st->send_window; }

uint32_t mux_stream_recv_window(const struct mux_stream *st) { return st->recv_window; }

size_t mux_stream_send_room(const struct mux_stream *st)
{
    if (evbuffer_get_length(st->s->out) >= MUX_OUT_SOFT_LIMIT)
        return 0;
    return st->send_window;
}

static bool mux_stream_can_send(const struct mux_stream *st)
{
    const struct mux_session *s = st->s;
    /* Before the ConnectResponse only the server of a session with optimistic data. */
    bool may = st->opened || (s->early_data && s->role == MUX_ROLE_SERVER);
    return st->attached && may && !st->local_shut && !st->close_sent && !s->failed &&
           !s->freeing;
}

/* The largest count <= limit that ends where a chain of src ends, so that
 * evbuffer_remove_buffer() moves chains rather than copying bytes. Bulk reads fill chains
 * of just under a frame (sockread.c), so a bulk stream's frames are usually one chain
 * each. When whole chains would fill less than half a frame (one chain longer than limit,
 * or many small ones), limit itself: a copy of a few KiB beats many small frames. */
static size_t mux_whole_chains(struct evbuffer *src, size_t limit)
{
    struct evbuffer_iovec vec[8];
    int n = evbuffer_peek(src, (ev_ssize_t)limit, NULL, vec, 8);
    size_t total = 0;
    for (int i = 0; i < n && i < 8 && total + vec[i].iov_len <= limit; i++)
        total += vec[i].iov_len;
    /* Never 0: with limit 1 (a window of one byte left) "half a frame" is 0 too, and a
     * count of 0 made an empty Data frame per turn of the caller's loop. */
    return total > 0 && total >= limit / 2 ? total : limit;
}

/* Payloads up to this size are copied in behind their header rather than moved as
 * chains of their own. */
#define MUX_COALESCE_MAX 4096u

/* Appends one Data frame of n bytes from src to the output. A small payload is copied in
 * behind its header, so that the small frames of request/response traffic sit in one
 * contiguous chain: over TLS each chain becomes at least one record (bufferevent_openssl
 * seals chain by chain), and a header, a 100-byte payload and the next frame's header in
 * three chains cost three records where one would do. Large payloads move as whole
 * chains, without a copy. */
static int mux_out_data(struct mux_session *s, uint32_t id, struct evbuffer *src, size_t n)
{
    uint8_t frame[MUX_DATA_HEADER_LEN + MUX_COALESCE_MAX];
    frame_encode_data_header(frame, MUX_DATA_HEADER_LEN, id, n);
    if (n <= MUX_COALESCE_MAX)
        return evbuffer_remove(src, frame + MUX_DATA_HEADER_LEN, n) == (int)n &&
                       evbuffer_add(s->out, frame, MUX_DATA_HEADER_LEN + n) == 0
                   ? 0
                   : -1;
    return evbuffer_add(s->out, frame, MUX_DATA_HEADER_LEN) == 0 &&
                   evbuffer_remove_buffer(src, s->out, n) == (int)n
               ? 0
               : -1;
}

int mux_stream_write(struct mux_stream *st, struct evbuffer *src)
{
    struct mux_session *s = st->s;
    if (!mux_stream_can_send(st))
        return MUX_E_STATE;
    size_t total = 0, left;
    while ((left = evbuffer_get_length(src)) > 0) {
        size_t room = mux_stream_send_room(st);
        if (room == 0) {
            /* Window closed: WindowUpdate wakes us. Output full: the drain does. */
            if (st->send_window > 0 && !st->blocked) {
                TAILQ_INSERT_TAIL(&s->blocked, st, blocked_link);
                st->blocked = true;
            }
            break;
        }
        size_t n = left < room ? left : room;
        if (n > FRAME_MAX_DATA)
            n = FRAME_MAX_DATA;
        if (n < left)
            n = mux_whole_chains(src, n);
        if (mux_out_data(s, st->id, src, n) != 0)
            return mux_fail(s, MUX_E_NOMEM, "out of memory");
        st->send_window -= (uint32_t)n;
        total += n;
    }
    return total > (size_t)INT32_MAX ? INT32_MAX : (int)total;
}

bool mux_stream_can_splice(const struct mux_stream *st) { return st->s->splice != NULL; }

enum mux_splice_result mux_stream_splice(struct mux_stream *st, int fd, size_t *moved)
{
    struct mux_session *s = st->s;
    *moved = 0;
    if (!s->splice)
        return MUX_SPLICE_NONE;
    if (!mux_stream_can_send(st))
        return MUX_SPLICE_STATE;
    if (st->send_window == 0)
        return MUX_SPLICE_BLOCKED; /* the WindowUpdate calls on_writable */
    if (!s->splice->ready(s->splice_arg)) {
        /* Our last zero-copy frame is still going out: it sets the pace, as the soft
         * limit does for copied frames. */
        if (!st->splice_waiting) {
            TAILQ_INSERT_TAIL(&s->splice_wait, st, splice_link);
            st->splice_waiting = true;
        }
        return MUX_SPLICE_BLOCKED;
    }
    /* Frames in the output go first. Waiting for it to empty could starve this stream
     * while copying streams keep it topped up; copying takes its turn among them. */
    if (evbuffer_get_length(s->out) > 0)
        return MUX_SPLICE_COPY;
    size_t max = st->send_window < FRAME_MAX_DATA ? st->send_window : FRAME_MAX_DATA;
    ssize_t n = s->splice->stage(s->splice_arg, fd, max);
    if (n == 0)
        return MUX_SPLICE_EOF;
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? MUX_SPLICE_AGAIN : MUX_SPLICE_ERROR;
    uint8_t hdr[MUX_DATA_HEADER_LEN];
    frame_encode_data_header(hdr, sizeof(hdr), st->id, (size_t)n);
    st->send_window -= (uint32_t)n;
    s->splice->send(s->splice_arg, hdr, sizeof(hdr), (size_t)n);
    *moved = (size_t)n;
    return MUX_SPLICE_MOVED;
}

/* How much larger the next grant may make the window. A fixed 256 KiB window caps one
 * stream at 256 KiB per round trip: across a WAN, one stream needs a window of its rate
 * times the round trip (4 Gb/s x 100 ms = 50 MB). A WindowUpdate that finds
 *
 *  - the peer starved: the last timed window round (mux_round_end) took about one round
 *    trip, so the window, not the sender, set the pace; and
 *  - the sink empty: the consumer handed on everything that arrived, so it keeps up and a
 *    bigger window will not just park bytes here,
 *
 * is one round where more window would have moved more. Rounds are timed one at a time,
 * so growth happens at most about once per round trip, like TCP's receive-window
 * auto-tuning, and stops by itself once the window exceeds about twice rate x round trip
 * (a round then takes longer than two round trips), or once the consumer, not the window,
 * is the bottleneck (the sink no longer empties before the next data arrives).
 *
 * One such update proves nothing: a public reader that never reads still has kernel socket
 * buffers that swallow the first bytes at once; they fill, and the next update never
 * comes. So the window first doubles after MUX_GROW_STREAK of them, then with each further
 * one (doubling: a 256 KiB window reaches 64 MiB in ten rounds). An update that finds more
 * than half the window still waiting in the sink (the consumer lags) resets the streak;
 * one with less waiting neither counts nor resets, and leaves the observation to the next
 * one (a burst may be half handed on when half a window has been consumed). All growth of
 * one session together stays within its buffer limit, so N stalled streams pin at most N
 * initial windows plus that limit; within it, one stream may take it all. */
static uint32_t mux_window_growth(struct mux_stream *st, size_t waiting)
{
    if (waiting > 0) {
        if (waiting > st->recv_limit / 2)
            st->grow_streak = 0;
        return 0;
    }
    if (!st->starved)
        return 0;
    if (st->grow_streak < MUX_GROW_STREAK)
        st->grow_streak++;
    if (st->grow_streak < MUX_GROW_STREAK || st->recv_limit >= MUX_MAX_RECV_LIMIT)
        return 0;
    size_t grow = st->recv_limit;
    if (grow > MUX_MAX_RECV_LIMIT - st->recv_limit)
        grow = MUX_MAX_RECV_LIMIT - st->recv_limit;
    size_t room = st->s->buffer_limit > st->s->grown ? st->s->buffer_limit - st->s->grown : 0;
    return (uint32_t)(grow < room ? grow : room);
}

void mux_stream_consumed(struct mux_stream *st, size_t n)
{
    /* Never credit more than was received: the window stays <= the limit we granted. */
    uint32_t outstanding = st->recv_limit - st->recv_window - st->recv_consumed;
    if (n > outstanding)
        n = outstanding;
    st->recv_consumed += (uint32_t)n;
    /* Not before our ConnectResponse: the server takes a WindowUpdate for a stream it does
     * not see open as a protocol error. The credit is kept for the next one. */
    if (st->close_sent || st->remote_shut || !st->opened)
        return;
    /* Credit goes back at half the window, or at a quarter once the sink is empty: data
     * comes in one burst per round trip, and a consumer that drained the burst past the
     * half-window mark would otherwise keep the rest of it uncredited until the next
     * burst, leaving up to half the window idle every round. Neither step is ever more
     * than MUX_UPDATE_STEP_MAX: credit held here is window the sender cannot use, and a
     * quarter of a window grown for a WAN is tens of MiB (of a 128 MiB window, 0-32 MiB
     * held back, 12.5 % of it on average). */
    struct evbuffer *sink = st->sink ? st->sink : st->rx;
    size_t waiting = sink ? evbuffer_get_length(sink) : 0;
    uint32_t half = st->recv_limit / 2, quarter = st->recv_limit / 4;
    if (half > MUX_UPDATE_STEP_MAX)
        half = MUX_UPDATE_STEP_MAX;
    if (quarter > MUX_UPDATE_STEP_MAX)
        quarter = MUX_UPDATE_STEP_MAX;
    if (st->recv_consumed < half && (waiting > 0 || st->recv_consumed < quarter))
        return;
    uint32_t grow = mux_window_growth(st, waiting);
    uint32_t increment = st->recv_consumed + grow;
    uint8_t buf[FRAME_HEADER_LEN + 8];
    if (mux_emit(st->s, buf, frame_encode_window_update(buf, sizeof(buf), st->id,
                                                         increment)) == MUX_OK) {
        st->recv_window += increment;
        st->recv_limit += grow;
        st->s->grown += grow;
        st->recv_consumed = 0;
        if (!st->round_open) {
            st->round_open = true;
            st->round_mark = st->rx_total + st->recv_window;
            st->round_start_us = mux_clock_us(st->s);
        }
        /* Only an update that judged the round (sink empty) consumes the observation:
         * a half-window one in the middle of a burst leaves it for the burst's end. */
        if (waiting == 0)
            st->starved = false;
    }
}

int mux_stream_shut_write(struct mux_stream *st)
{
    uint8_t buf[FRAME_HEADER_LEN + 4];
    /* Optimistic data is Data only: the peer takes ShutWrite on an unopened stream as a
     * protocol error. */
    if (!mux_stream_can_send(st) || !st->opened)
        return MUX_E_STATE;
    st->local_shut = true;
    mux_unblock(st);
    return mux_emit(st->s, buf, frame_encode_shut_write(buf, sizeof(buf), st->id));
}

void mux_stream_close(struct mux_stream *st)
{
    struct mux_session *s = st->s;
    if (!st->attached || s->freeing)
        return;
    mux_detach(st);
    if (!st->close_sent) {
        uint8_t buf[FRAME_HEADER_LEN + 4];
        st->close_sent = true;
        mux_emit(s, buf, frame_encode_close(buf, sizeof(buf), st->id));
    }
    if (st->close_recv)
        mux_finish(st);
    mux_gc(s);
}

/* Unit tests for the tunnel session (src/common/mux.c): two sessions wired back to back
 * in memory, no sockets. */
#include "check.h"
#include "mux.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>

#include "frame.h"

/* What the callbacks saw, per stream end. */
struct end {
    struct mux_stream *st;
    int responses;
    int status;
    size_t data;
    int writable;
    int shut;
    int closed;
    enum mux_close_reason why;
    bool close_on_shut;      /* calls mux_stream_close from inside on_shut */
};

struct pair {
    struct evbuffer *out_srv, *out_cli;
    struct mux_session *srv, *cli;
    int hellos, hello_responses;
    bool refuse;             /* the client treats the HelloResponse as a refusal */
    /* Client side: how to answer the next ConnectRequest (-1 = later). */
    int answer;
    char last_host[256];
    uint16_t last_port;
    struct end cli_ends[8];
    int ncli;
    uint64_t now_us;         /* the clients' clock when wan_clock() is set */
};

static uint64_t pair_clock(void *arg) { return ((struct pair *)arg)->now_us; }

/* The client's window auto-tuning reads p->now_us, which wan_round advances. */
static void wan_clock(struct pair *p) { mux_session_set_clock(p->cli, pair_clock, p); }

static void end_on_connect_response(struct mux_stream *st, uint8_t status, void *arg)
{
    struct end *e = arg;
    e->responses++;
    e->status = status;
}

static void end_on_data(struct mux_stream *st, size_t len, void *arg)
{
    ((struct end *)arg)->data += len;
}

static void end_on_writable(struct mux_stream *st, void *arg) { ((struct end *)arg)->writable++; }

static void end_on_shut(struct mux_stream *st, void *arg)
{
    struct end *e = arg;
    e->shut++;
    if (e->close_on_shut) {
        mux_stream_close(st);
        e->st = NULL;
    }
}

static void end_on_close(struct mux_stream *st, enum mux_close_reason why, void *arg)
{
    struct end *e = arg;
    e->closed++;
    e->why = why;
    e->st = NULL;
}

static const struct mux_stream_callbacks end_cb = {
    .on_connect_response = end_on_connect_response,
    .on_data = end_on_data,
    .on_writable = end_on_writable,
    .on_shut = end_on_shut,
    .on_close = end_on_close,
};

static int srv_on_json(struct mux_session *s, uint8_t type, const char *json, size_t len,
                       void *arg)
{
    struct pair *p = arg;
    p->hellos++;
    mux_session_set_open(s);
    const char ok[] = "{\"ok\":true,\"message\":\"welcome\"}";
    mux_session_send_json(s, FRAME_HELLO_RESPONSE, ok, sizeof(ok) - 1);
    return 0;
}

static int cli_on_json(struct mux_session *s, uint8_t type, const char *json, size_t len,
                       void *arg)
{
    struct pair *p = arg;
    p->hello_responses++;
    if (p->refuse)
        return MUX_STOPPED;
    mux_session_set_open(s);
    return 0;
}

static void cli_on_connect_request(struct mux_session *s, struct mux_stream *st,
                                   const char *host, uint16_t port, void *arg)
{
    struct pair *p = arg;
    snprintf(p->last_host, sizeof(p->last_host), "%s", host);
    p->last_port = port;
    struct end *e = &p->cli_ends[p->ncli++ % 8];
    memset(e, 0, sizeof(*e));
    e->st = st;
    mux_stream_set_callbacks(st, &end_cb, e);
    if (p->answer >= 0) {
        CHECK(mux_stream_respond(st, (uint8_t)p->answer) == MUX_OK);
        if (p->answer != FRAME_STATUS_OK)
            e->st = NULL; /* a refusal ends our reference */
    }
}

static const struct mux_session_callbacks srv_cb = {.on_json = srv_on_json};
static const struct mux_session_callbacks cli_cb = {
    .on_connect_request = cli_on_connect_request,
    .on_json = cli_on_json,
};

/* Moves everything each side queued to the other until both are quiet. */
static int pump(struct pair *p)
{
    for (int i = 0; i < 1000; i++) {
        if (evbuffer_get_length(p->out_srv) == 0 && evbuffer_get_length(p->out_cli) == 0)
            return 0;
        int rc = mux_session_input(p->cli, p->out_srv);
        if (rc < 0)
            return rc;
        mux_session_output_drained(p->srv);
        rc = mux_session_input(p->srv, p->out_cli);
        if (rc < 0)
            return rc;
        mux_session_output_drained(p->cli);
    }
    return 0;
}

static void pair_init(struct pair *p)
{
    memset(p, 0, sizeof(*p));
    p->out_srv = evbuffer_new();
    p->out_cli = evbuffer_new();
    p->srv = mux_session_new(MUX_ROLE_SERVER, p->out_srv, &srv_cb, p);
    p->cli = mux_session_new(MUX_ROLE_CLIENT, p->out_cli, &cli_cb, p);
    const char hello[] = "{\"name\":\"default\",\"token\":\"t\",\"version\":\"1\"}";
    CHECK(mux_session_send_json(p->cli, FRAME_HELLO, hello, sizeof(hello) - 1) == MUX_OK);
    CHECK(pump(p) == 0);
    CHECK(p->hellos == 1 && p->hello_responses == 1);
    CHECK(mux_session_is_open(p->srv) && mux_session_is_open(p->cli));
}

static void pair_free(struct pair *p)
{
    mux_session_free(p->srv);
    mux_session_free(p->cli);
    evbuffer_free(p->out_srv);
    evbuffer_free(p->out_cli);
}

static struct evbuffer *pattern(size_t n, unsigned seed)
{
    struct evbuffer *b = evbuffer_new();
    uint8_t chunk[4096];
    for (size_t off = 0; off < n;) {
        size_t k = n - off < sizeof(chunk) ? n - off : sizeof(chunk);
        for (size_t i = 0; i < k; i++)
            chunk[i] = (uint8_t)((off + i) * 31u + seed);
        evbuffer_add(b, chunk, k);
        off += k;
    }
    return b;
}

static bool matches_pattern(struct evbuffer *b, size_t n, unsigned seed)
{
    if (evbuffer_get_length(b) != n)
        return false;
    const uint8_t *p = evbuffer_pullup(b, -1);
    for (size_t i = 0; i < n; i++) {
        if (p[i] != (uint8_t)(i * 31u + seed))
            return false;
    }
    return true;
}

/* Opens a stream from the server and has the client accept it. */
static struct mux_stream *open_stream(struct pair *p, struct end *se, struct end **ce)
{
    memset(se, 0, sizeof(*se));
    p->answer = FRAME_STATUS_OK;
    se->st = mux_stream_open(p->srv, "10.0.0.5", 5432, &end_cb, se);
    CHECK(se->st != NULL);
    CHECK(pump(p) == 0);
    CHECK(se->responses == 1 && se->status == FRAME_STATUS_OK);
    *ce = &p->cli_ends[(p->ncli - 1) % 8];
    return se->st;
}

static void test_open_data_close(void)
{
    struct pair p;
    struct end se;
    struct end *ce;
    pair_init(&p);
    struct mux_stream *st = open_stream(&p, &se, &ce);
    CHECK(strcmp(p.last_host, "10.0.0.5") == 0 && p.last_port == 5432);
    CHECK(mux_session_stream_count(p.srv) == 1 && mux_session_stream_count(p.cli) == 1);

    struct evbuffer *a = pattern(100000, 1);
    CHECK(mux_stream_write(st, a) == 100000);
    CHECK(evbuffer_get_length(a) == 0);
    CHECK(pump(&p) == 0);
    CHECK(ce->data == 100000);
    CHECK(matches_pattern(mux_stream_sink(ce->st), 100000, 1));

    struct evbuffer *b = pattern(7000, 2);
    CHECK(mux_stream_write(ce->st, b) == 7000);
    CHECK(pump(&p) == 0);
    CHECK(se.data == 7000 && matches_pattern(mux_stream_sink(st), 7000, 2));

    /* Half-close: server -> client direction ends; the other still flows. */
    CHECK(mux_stream_shut_write(st) == MUX_OK);
    CHECK(mux_stream_write(st, a) == MUX_E_STATE);
    CHECK(pump(&p) == 0);
    CHECK(ce->shut == 1 && se.shut == 0);
    evbuffer_add(b, "xyz", 3);
    CHECK(mux_stream_write(ce->st, b) == 3);
    CHECK(pump(&p) == 0);
    CHECK(se.data == 7003);
    CHECK(mux_stream_shut_write(ce->st) == MUX_OK);
    CHECK(pump(&p) == 0);
    CHECK(se.shut == 1);

    /* Close from the server: the client hears it once and answers; both free it. */
    mux_stream_close(st);
    CHECK(mux_session_stream_count(p.srv) == 0);
    /* Until the client's Close comes back the stream keeps its entry, and says so. */
    CHECK(mux_session_closing_count(p.srv) == 1 && mux_session_closing_count(p.cli) == 0);
    CHECK(pump(&p) == 0);
    CHECK(ce->closed == 1 && ce->why == MUX_CLOSE_PEER && se.closed == 0);
    CHECK(mux_session_stream_count(p.cli) == 0);
    CHECK(mux_session_closing_count(p.srv) == 0 && mux_session_closing_count(p.cli) == 0);
    evbuffer_free(a);
    evbuffer_free(b);
    pair_free(&p);
}

/* Appends n pattern bytes (continuing at offset off) to dst as chains of their own. */
static void add_chain(struct evbuffer *dst, size_t off, size_t n, unsigned seed)
{
    struct evbuffer *all = pattern(off + n, seed);
    struct evbuffer *piece = evbuffer_new();
    evbuffer_drain(all, off);
    evbuffer_add_buffer(piece, all);
    CHECK(evbuffer_pullup(piece, -1) != NULL); /* one chain */
    evbuffer_add_buffer(dst, piece);
    evbuffer_free(piece);
    evbuffer_free(all);
}

/* Data frames end where the sender's chains end, so chains move instead of being copied;
 * a chain longer than a frame is split, small chains are packed. Bytes arrive intact. */
static void test_frames_follow_chains(void)
{
    struct pair p;
    struct end se;
    struct end *ce;
    pair_init(&p);
    struct mux_stream *st = open_stream(&p, &se, &ce);
    struct evbuffer *src = evbuffer_new();
    add_chain(src, 0, 40000, 4);
    add_chain(src, 40000, 40000, 4);
    add_chain(src, 80000, 100000, 4);
    CHECK(mux_stream_write(st, src) == 180000);

    size_t want[] = {40000, 40000, FRAME_MAX_DATA, 100000 - FRAME_MAX_DATA};
    size_t nframes = 0, len = evbuffer_get_length(p.out_srv);
    uint8_t *wire = malloc(len);
    CHECK(wire && evbuffer_copyout(p.out_srv, wire, len) == (ev_ssize_t)len);
    for (size_t off = 0, used = 0; wire && off < len; off += used) {
        struct frame f;
        CHECK(frame_decode(wire + off, len - off, &f, &used) == FRAME_OK);
        CHECK(f.type == FRAME_DATA && nframes < 4 && f.data_len == want[nframes]);
        nframes++;
    }
    free(wire);
    CHECK(nframes == 4);
    CHECK(pump(&p) == 0);
    CHECK(matches_pattern(mux_stream_sink(ce->st), 180000, 4));

    /* Many small chains are packed into full frames, not a frame per few chains (80 KB:
     * what is left of the 256 KiB window). */
    for (size_t i = 0; i < 80; i++)
        add_chain(src, i * 1000, 1000, 5);
    CHECK(mux_stream_write(st, src) == 80000);
    /* Two frames, 65536 + 14464 bytes, not ten of eight chains each. */
    CHECK(evbuffer_get_length(p.out_srv) == 80000 + 2 * (FRAME_HEADER_LEN + 4));
    CHECK(pump(&p) == 0);
    struct evbuffer *sink = mux_stream_sink(ce->st);
    evbuffer_drain(sink, 180000);
    CHECK(matches_pattern(sink, 80000, 5));
    evbuffer_free(src);
    pair_free(&p);
}

/* A window of exactly one byte and a chain of several in the source: one Data frame of
 * one byte, never a stream of empty frames (the output grew by 100,000 of them a call). */
static void test_one_byte_window(void)
{
    struct pair p;
    struct end se;
    struct end *ce;
    pair_init(&p);
    struct mux_stream *st = open_stream(&p, &se, &ce);
    struct evbuffer *most = pattern(MUX_INITIAL_WINDOW - 1, 5);
    CHECK(mux_stream_write(st, most) == (int)MUX_INITIAL_WINDOW - 1);
    CHECK(mux_stream_send_window(st) == 1);
    size_t before = evbuffer_get_length(p.out_srv);
    struct evbuffer *more = pattern(5000, 6);
    CHECK(mux_stream_write(st, more) == 1);
    CHECK(evbuffer_get_length(p.out_srv) - before == FRAME_HEADER_LEN + 4 + 1);
    CHECK(evbuffer_get_length(more) == 4999);
    CHECK(mux_stream_send_window(st) == 0);
    CHECK(mux_stream_write(st, more) == 0);
    CHECK(evbuffer_get_length(p.out_srv) - before == FRAME_HEADER_LEN + 4 + 1);
    CHECK(pump(&p) == 0);
    CHECK(ce->data == MUX_INITIAL_WINDOW);
    evbuffer_free(most);
    evbuffer_free(more);
    pair_free(&p);
}

static void test_flow_control(void)
{
    struct pair p;
    struct end se1, se2;
    struct end *ce1, *ce2;
    pair_init(&p);
    struct mux_stream *st1 = open_stream(&p, &se1, &ce1);
    struct mux_stream *st2 = open_stream(&p, &se2, &ce2);
    struct evbuffer *big = pattern(1 << 20, 3);

    /* Nobody drains stream 1 on the client: the sender stops at one window. */
    CHECK(mux_stream_write(st1, big) == (int)MUX_INITIAL_WINDOW);
    CHECK(mux_stream_send_window(st1) == 0);
    CHECK(mux_stream_write(st1, big) == 0);
    CHECK(pump(&p) == 0);
    CHECK(ce1->data == MUX_INITIAL_WINDOW);
    CHECK(mux_stream_write(st1, big) == 0);

    /* Stream 2 flows while stream 1 is stalled. */
    struct evbuffer *small = pattern(50000, 4);
    CHECK(mux_stream_write(st2, small) == 50000);
    CHECK(pump(&p) == 0);
    CHECK(ce2->data == 50000);

    /* Consuming less than half the window gives nothing back. */
    struct evbuffer *sink1 = mux_stream_sink(ce1->st);
    evbuffer_drain(sink1, 1000);
    mux_stream_consumed(ce1->st, 1000);
    CHECK(pump(&p) == 0);
    CHECK(mux_stream_send_window(st1) == 0 && se1.writable == 0);

    /* Half the window consumed: one WindowUpdate, the sender resumes. */
    evbuffer_drain(sink1, MUX_INITIAL_WINDOW / 2);
    mux_stream_consumed(ce1->st, MUX_INITIAL_WINDOW / 2);
    CHECK(pump(&p) == 0);
    CHECK(se1.writable == 1);
    CHECK(mux_stream_send_window(st1) == MUX_INITIAL_WINDOW / 2 + 1000);
    CHECK(mux_stream_write(st1, big) == (int)(MUX_INITIAL_WINDOW / 2 + 1000));
    CHECK(pump(&p) == 0);

    /* Over-reporting consumption never credits more than was received: the window is back
     * to its limit, which a fast reader may have doubled once (auto-tuning), no more. */
    mux_stream_consumed(ce1->st, 100u << 20);
    CHECK(pump(&p) == 0);
    CHECK(mux_stream_send_window(st1) == MUX_INITIAL_WINDOW ||
          mux_stream_send_window(st1) == 2 * MUX_INITIAL_WINDOW);
    /* However fast the reader, the window never passes the initial window plus the
     * session's buffer limit. */
    for (int round = 0; round < 12; round++) {
        size_t sent = (size_t)mux_stream_write(st1, big);
        CHECK(pump(&p) == 0);
        evbuffer_drain(sink1, sent);
        mux_stream_consumed(ce1->st, sent);
        CHECK(pump(&p) == 0);
        struct evbuffer *more = pattern(sent, 5);
        evbuffer_add_buffer(big, more);
        evbuffer_free(more);
    }
    CHECK(mux_stream_send_window(st1) >= MUX_INITIAL_WINDOW &&
          mux_stream_send_window(st1) <= MUX_INITIAL_WINDOW + MUX_SESSION_BUFFER_LIMIT);
    evbuffer_free(big);
    evbuffer_free(small);
    pair_free(&p);
}

/* Many streams writing without the output being drained: the session output stays
 * bounded, and the blocked streams are woken round robin when it drains. */
static void test_output_bound(void)
{
    struct pair p;
    struct end se[6];
    struct end *ce;
    pair_init(&p);
    struct mux_stream *st[6];
    for (int i = 0; i < 6; i++)
        st[i] = open_stream(&p, &se[i], &ce);
    struct evbuffer *src = pattern(6 * MUX_INITIAL_WINDOW, 5);
    size_t total = 0;
    for (int i = 0; i < 6; i++) {
        int n = mux_stream_write(st[i], src);
        CHECK(n >= 0);
        total += (size_t)n;
    }
    CHECK(evbuffer_get_length(p.out_srv) < MUX_OUT_SOFT_LIMIT + FRAME_MAX_DATA + 64);
    CHECK(total < 6 * MUX_INITIAL_WINDOW);
    /* Drain the output (the peer takes it) and tell the session. */
    CHECK(mux_session_input(p.cli, p.out_srv) == MUX_OK);
    mux_session_output_drained(p.srv);
    int woken = 0;
    for (int i = 0; i < 6; i++)
        woken += se[i].writable;
    CHECK(woken >= 1);
    evbuffer_free(src);
    pair_free(&p);
}

static void test_refusal_and_race(void)
{
    struct pair p;
    struct end se;
    pair_init(&p);
    p.answer = FRAME_STATUS_NOT_ALLOWED;
    memset(&se, 0, sizeof(se));
    se.st = mux_stream_open(p.srv, NULL, 22, &end_cb, &se);
    CHECK(se.st != NULL);
    CHECK(pump(&p) == 0);
    CHECK(strcmp(p.last_host, "127.0.0.1") == 0 && p.last_port == 22);
    CHECK(se.responses == 1 && se.status == FRAME_STATUS_NOT_ALLOWED);
    CHECK(mux_session_stream_count(p.srv) == 0 && mux_session_stream_count(p.cli) == 0);

    /* The server gives up (connect timeout) while the client answers ok: no error. */
    p.answer = -1;
    memset(&se, 0, sizeof(se));
    se.st = mux_stream_open(p.srv, "h", 80, &end_cb, &se);
    CHECK(mux_session_input(p.cli, p.out_srv) == MUX_OK);
    struct end *ce = &p.cli_ends[(p.ncli - 1) % 8];
    CHECK(mux_stream_respond(ce->st, FRAME_STATUS_OK) == MUX_OK);
    mux_stream_close(se.st);
    CHECK(pump(&p) == 0);
    CHECK(se.responses == 0 && ce->closed == 1);
    CHECK(mux_session_stream_count(p.srv) == 0 && mux_session_stream_count(p.cli) == 0);

    /* Same, but the client's first bytes (a banner) and its ShutWrite follow its
     * ok before our Close reaches it: dropped with the stream, the session lives on. */
    memset(&se, 0, sizeof(se));
    se.st = mux_stream_open(p.srv, "h", 82, &end_cb, &se);
    CHECK(mux_session_input(p.cli, p.out_srv) == MUX_OK);
    ce = &p.cli_ends[(p.ncli - 1) % 8];
    CHECK(mux_stream_respond(ce->st, FRAME_STATUS_OK) == MUX_OK);
    struct evbuffer *banner = evbuffer_new();
    evbuffer_add(banner, "SSH-2.0-x\r\n", 11);
    CHECK(mux_stream_write(ce->st, banner) == 11);
    CHECK(mux_stream_shut_write(ce->st) == MUX_OK);
    evbuffer_free(banner);
    mux_stream_close(se.st);
    CHECK(pump(&p) == 0);
    CHECK(mux_session_error(p.srv)[0] == 0 && mux_session_error(p.cli)[0] == 0);
    CHECK(se.responses == 0 && se.data == 0);
    CHECK(mux_session_stream_count(p.srv) == 0 && mux_session_stream_count(p.cli) == 0);

    /* Same, but the client refuses while our Close is on its way. */
    memset(&se, 0, sizeof(se));
    se.st = mux_stream_open(p.srv, "h", 81, &end_cb, &se);
    CHECK(mux_session_input(p.cli, p.out_srv) == MUX_OK);
    ce = &p.cli_ends[(p.ncli - 1) % 8];
    mux_stream_close(se.st);
    CHECK(mux_stream_respond(ce->st, FRAME_STATUS_REFUSED) == MUX_OK);
    CHECK(pump(&p) == 0);
    CHECK(mux_session_stream_count(p.srv) == 0 && mux_session_stream_count(p.cli) == 0);
    pair_free(&p);
}

static void test_close_inside_callback_and_session_free(void)
{
    struct pair p;
    struct end se1, se2;
    struct end *ce1, *ce2;
    pair_init(&p);
    struct mux_stream *st1 = open_stream(&p, &se1, &ce1);
    open_stream(&p, &se2, &ce2);
    ce1->close_on_shut = true;
    CHECK(mux_stream_shut_write(st1) == MUX_OK);
    CHECK(pump(&p) == 0);
    CHECK(ce1->shut == 1 && se1.closed == 1 && se1.why == MUX_CLOSE_PEER);
    CHECK(mux_session_stream_count(p.cli) == 1 && mux_session_stream_count(p.srv) == 1);
    /* Freeing a session tells the application about every stream it still holds. */
    mux_session_free(p.srv);
    p.srv = NULL;
    CHECK(se2.closed == 1 && se2.why == MUX_CLOSE_SESSION);
    mux_session_free(p.cli);
    p.cli = NULL;
    CHECK(ce2->closed == 1 && ce2->why == MUX_CLOSE_SESSION);
    pair_free(&p);
}

static void test_keepalive(void)
{
    struct pair p;
    pair_init(&p);
    CHECK(mux_session_rtt_ms(p.srv) == 0);
    CHECK(mux_session_send_keepalive(p.srv) == MUX_OK);
    CHECK(mux_session_send_keepalive(p.cli) == MUX_OK);
    CHECK(pump(&p) == 0);
    CHECK(mux_session_rtt_ms(p.srv) > 0 && mux_session_rtt_ms(p.cli) > 0);
    /* A stale echo of our own token is dropped, never bounced back. */
    uint8_t buf[32], stale[32];
    CHECK(mux_session_send_keepalive(p.srv) == MUX_OK);
    CHECK(evbuffer_get_length(p.out_srv) == FRAME_HEADER_LEN + 8);
    evbuffer_remove(p.out_srv, stale, FRAME_HEADER_LEN + 8);
    CHECK(mux_session_send_keepalive(p.srv) == MUX_OK);
    evbuffer_drain(p.out_srv, evbuffer_get_length(p.out_srv));
    evbuffer_add(p.out_cli, stale, FRAME_HEADER_LEN + 8);
    CHECK(mux_session_input(p.srv, p.out_cli) == MUX_OK);
    CHECK(evbuffer_get_length(p.out_srv) == 0);
    /* The peer's token is answered with the same token. */
    uint8_t peer_tok[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    int k = frame_encode_keepalive(buf, sizeof(buf), peer_tok);
    evbuffer_add(p.out_cli, buf, (size_t)k);
    CHECK(mux_session_input(p.srv, p.out_cli) == MUX_OK);
    CHECK(evbuffer_get_length(p.out_srv) == (size_t)k);
    CHECK(memcmp(evbuffer_pullup(p.out_srv, -1), buf, (size_t)k) == 0);
    evbuffer_drain(p.out_srv, (size_t)k);
    /* An empty KeepAlive is only liveness: no answer. */
    int n = frame_encode_keepalive(buf, sizeof(buf), NULL);
    evbuffer_add(p.out_cli, buf, (size_t)n);
    CHECK(mux_session_input(p.srv, p.out_cli) == MUX_OK);
    CHECK(evbuffer_get_length(p.out_srv) == 0);
    pair_free(&p);
}

/* Feeds raw bytes to a fresh, open client session; returns mux_session_input's result. */
static int feed(struct pair *p, const uint8_t *bytes, size_t n)
{
    evbuffer_add(p->out_srv, bytes, n);
    return mux_session_input(p->cli, p->out_srv);
}

static void test_protocol_errors(void)
{
    struct pair p;
    uint8_t buf[FRAME_HEADER_LEN + FRAME_MAX_PAYLOAD];
    int n;

    pair_init(&p);
    n = frame_encode_data(buf, sizeof(buf), 99, (const uint8_t *)"x", 1);
    CHECK(feed(&p, buf, (size_t)n) == MUX_E_PROTOCOL);
    CHECK(strstr(mux_session_error(p.cli), "unknown") != NULL);
    /* A failed session stays failed. */
    CHECK(mux_session_input(p.cli, p.out_srv) == MUX_E_PROTOCOL);
    pair_free(&p);

    pair_init(&p);
    const uint8_t bad_version[] = {0x02, 0x05, 0, 0, 0, 0};
    CHECK(feed(&p, bad_version, sizeof(bad_version)) == MUX_E_FRAME);
    pair_free(&p);

    pair_init(&p);
    const uint8_t too_long[] = {0x01, 0x03, 0, 1, 0, 9};
    CHECK(feed(&p, too_long, sizeof(too_long)) == MUX_E_FRAME);
    pair_free(&p);

    pair_init(&p);
    const uint8_t zero_inc[] = {0x01, 0x08, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0};
    CHECK(feed(&p, zero_inc, sizeof(zero_inc)) == MUX_E_FRAME);
    pair_free(&p);

    /* Window overflow: increments that take a window past 2^31. */
    struct end se;
    struct end *ce;
    pair_init(&p);
    struct mux_stream *st = open_stream(&p, &se, &ce);
    uint32_t id = mux_stream_id(st);
    n = frame_encode_window_update(buf, sizeof(buf), id, 1u << 30);
    CHECK(feed(&p, buf, (size_t)n) == MUX_OK);
    CHECK(feed(&p, buf, (size_t)n) == MUX_E_PROTOCOL);
    CHECK(strstr(mux_session_error(p.cli), "overflow") != NULL);
    pair_free(&p);

    /* Data beyond the window. */
    pair_init(&p);
    st = open_stream(&p, &se, &ce);
    id = mux_stream_id(st);
    static uint8_t chunk[FRAME_MAX_DATA];
    int rc = MUX_OK;
    for (int i = 0; i < 5 && rc == MUX_OK; i++) {
        n = frame_encode_data(buf, sizeof(buf), id, chunk, sizeof(chunk));
        rc = feed(&p, buf, (size_t)n);
    }
    CHECK(rc == MUX_E_PROTOCOL);
    CHECK(strstr(mux_session_error(p.cli), "window") != NULL);
    pair_free(&p);

    /* Stream frames before Hello, and a Hello sent to the client. */
    struct evbuffer *o = evbuffer_new();
    struct mux_session *s = mux_session_new(MUX_ROLE_SERVER, o, NULL, NULL);
    struct evbuffer *in = evbuffer_new();
    n = frame_encode_keepalive(buf, sizeof(buf), NULL);
    evbuffer_add(in, buf, (size_t)n);
    CHECK(mux_session_input(s, in) == MUX_E_PROTOCOL);
    mux_session_free(s);
    evbuffer_free(in);
    evbuffer_free(o);

    pair_init(&p);
    n = frame_encode_json(buf, sizeof(buf), FRAME_HELLO, "{}", 2);
    CHECK(feed(&p, buf, (size_t)n) == MUX_E_PROTOCOL);
    pair_free(&p);

    /* ConnectRequest for a conn_id in use; Data after ShutWrite. */
    pair_init(&p);
    st = open_stream(&p, &se, &ce);
    n = frame_encode_connect_request(buf, sizeof(buf), mux_stream_id(st), 80, NULL);
    CHECK(feed(&p, buf, (size_t)n) == MUX_E_PROTOCOL);
    pair_free(&p);

    pair_init(&p);
    st = open_stream(&p, &se, &ce);
    n = frame_encode_shut_write(buf, sizeof(buf), mux_stream_id(st));
    CHECK(feed(&p, buf, (size_t)n) == MUX_OK);
    n = frame_encode_data(buf, sizeof(buf), mux_stream_id(st), (const uint8_t *)"x", 1);
    CHECK(feed(&p, buf, (size_t)n) == MUX_E_PROTOCOL);
    pair_free(&p);

    /* A Close for an unknown stream is a tolerated race, not an error. */
    pair_init(&p);
    n = frame_encode_close(buf, sizeof(buf), 12345);
    CHECK(feed(&p, buf, (size_t)n) == MUX_OK);
    pair_free(&p);
}

/* One round of a reader: the server sends what the window allows, the client's
 * application drains `drain` of it from the sink and reports it. Returns bytes sent. */
static size_t flow_round(struct pair *p, struct mux_stream *st, struct end *ce,
                         struct evbuffer *src, size_t drain)
{
    size_t sent = (size_t)mux_stream_write(st, src);
    CHECK(pump(p) == 0);
    struct evbuffer *sink = mux_stream_sink(ce->st);
    size_t have = evbuffer_get_length(sink);
    if (drain > have)
        drain = have;
    evbuffer_drain(sink, drain);
    mux_stream_consumed(ce->st, drain);
    CHECK(pump(p) == 0);
    return sent;
}

static struct evbuffer *endless(void) { return pattern(64u << 20, 1); }

/* Window auto-tuning grows a stream only while its consumer really drains, and a
 * session's growth stays within its buffer limit. */
static void test_window_growth_rule(void)
{
    struct pair p;
    struct end se, *ce;
    struct evbuffer *src = endless();

    /* A reader that keeps draining everything earns a bigger window. */
    pair_init(&p);
    struct mux_stream *st = open_stream(&p, &se, &ce);
    for (int i = 0; i < 16; i++)
        flow_round(&p, st, ce, src, SIZE_MAX);
    CHECK(mux_stream_send_window(st) > MUX_INITIAL_WINDOW);
    CHECK(mux_session_buffer_grown(p.cli) > 0);
    pair_free(&p);

    /* The kernel swallowing the first bytes of a reader that never reads: one fast
     * update, then nothing drains. No growth. */
    pair_init(&p);
    st = open_stream(&p, &se, &ce);
    flow_round(&p, st, ce, src, MUX_INITIAL_WINDOW / 2);  /* first update: slow by origin */
    flow_round(&p, st, ce, src, SIZE_MAX);                /* fast, everything handed on */
    for (int i = 0; i < 8; i++)
        flow_round(&p, st, ce, src, 0);                   /* then stuck */
    CHECK(mux_session_buffer_grown(p.cli) == 0);
    CHECK(mux_stream_send_window(st) == 0);
    pair_free(&p);

    /* Fast updates while bytes keep waiting in the sink (the consumer lags) never grow. */
    pair_init(&p);
    st = open_stream(&p, &se, &ce);
    for (int i = 0; i < 16; i++)
        flow_round(&p, st, ce, src, MUX_INITIAL_WINDOW / 2);
    CHECK(evbuffer_get_length(mux_stream_sink(ce->st)) > 0);
    CHECK(mux_session_buffer_grown(p.cli) == 0);
    pair_free(&p);

    /* Many fast streams: their growth together stops at the session's limit, and a
     * finished stream gives its growth back. */
    pair_init(&p);
    mux_session_set_buffer_limit(p.cli, 3 * MUX_INITIAL_WINDOW);
    struct end ses[6], *ces[6];
    struct mux_stream *sts[6];
    for (int k = 0; k < 6; k++)
        sts[k] = open_stream(&p, &ses[k], &ces[k]);
    for (int i = 0; i < 16; i++)
        for (int k = 0; k < 6; k++)
            flow_round(&p, sts[k], ces[k], src, SIZE_MAX);
    CHECK(mux_session_buffer_grown(p.cli) > 0);
    CHECK(mux_session_buffer_grown(p.cli) <= 3 * MUX_INITIAL_WINDOW);
    size_t total_windows = 0;
    for (int k = 0; k < 6; k++)
        total_windows += mux_stream_send_window(sts[k]);
    CHECK(total_windows <= 6 * MUX_INITIAL_WINDOW + 3 * MUX_INITIAL_WINDOW);
    for (int k = 0; k < 6; k++) {
        mux_stream_close(sts[k]);
        CHECK(pump(&p) == 0);
    }
    for (int k = 0; k < 6; k++)
        if (ces[k]->st)
            mux_stream_close(ces[k]->st);
    CHECK(pump(&p) == 0);
    CHECK(mux_session_buffer_grown(p.cli) == 0);
    pair_free(&p);

    /* A limit of 0: no stream ever grows. */
    pair_init(&p);
    mux_session_set_buffer_limit(p.cli, 0);
    st = open_stream(&p, &se, &ce);
    for (int i = 0; i < 16; i++)
        flow_round(&p, st, ce, src, SIZE_MAX);
    CHECK(mux_session_buffer_grown(p.cli) == 0);
    CHECK(mux_stream_send_window(st) <= MUX_INITIAL_WINDOW);
    pair_free(&p);
    evbuffer_free(src);
}

/* One window round across a 20 ms round trip: the server sends until its window is used up (or
 * src runs dry), the frames reach the client in pieces of `piece` bytes, after each of
 * which the consumer drains everything when `drain` (a fast reader) or nothing, and only
 * then do the client's WindowUpdates travel back. Returns the bytes sent. */
static size_t wan_round(struct pair *p, struct mux_stream *st, struct end *ce,
                        struct evbuffer *src, size_t piece, bool drain)
{
    struct evbuffer *wire = evbuffer_new();
    p->now_us += 20000; /* the last round's credit crossed, this round's Data crosses back */
    size_t sent = 0;
    for (int i = 0; i < 100000; i++) {
        int n = mux_stream_write(st, src);
        CHECK(n >= 0);
        if (n <= 0)
            break;
        sent += (size_t)n;
        while (evbuffer_get_length(p->out_srv) > 0) {
            evbuffer_remove_buffer(p->out_srv, wire, piece);
            CHECK(mux_session_input(p->cli, wire) == MUX_OK);
            struct evbuffer *sink = mux_stream_sink(ce->st);
            size_t have = evbuffer_get_length(sink);
            if (drain && have > 0) {
                evbuffer_drain(sink, have);
                mux_stream_consumed(ce->st, have);
            }
        }
        CHECK(evbuffer_get_length(wire) == 0);
        mux_session_output_drained(p->srv);
        if (mux_stream_send_window(st) == 0 || evbuffer_get_length(src) == 0)
            break;
    }
    evbuffer_free(wire);
    CHECK(pump(p) == 0);
    return sent;
}

/* Window auto-tuning across a round trip (issue 19): a fast consumer's window doubles
 * about once per window round, up to the session's budget (past the old 2 MiB cap); a
 * stalled consumer's never grows; a sender with credit to spare never grows it; the
 * budget bounds the sum of all streams' growth, and one that ends gives its share back. */
static void test_window_autotune(void)
{
    const size_t budget = 8u << 20;
    struct pair p;
    struct end se, se2, *ce, *ce2;
    struct evbuffer *src = endless();

    /* Fast consumer, data in 64 KiB pieces, each drained at once (many empty-sink
     * WindowUpdates per round, and what the last pieces leave below a quarter window
     * waits for the next round): the window at most doubles per round (rounds are timed
     * one at a time: about every other round), the first time after two, and ends at exactly the initial window plus the budget. */
    pair_init(&p);
    wan_clock(&p);
    mux_session_set_buffer_limit(p.cli, budget);
    struct mux_stream *st = open_stream(&p, &se, &ce);
    size_t limit = MUX_INITIAL_WINDOW, rounds = 0, moved = 0;
    while (limit < MUX_INITIAL_WINDOW + budget && rounds < 30) {
        moved = wan_round(&p, st, ce, src, 65536, true);
        CHECK(moved + limit / 4 >= limit);      /* about the whole window every round */
        size_t next = MUX_INITIAL_WINDOW + mux_session_buffer_grown(p.cli);
        CHECK(next >= limit && next <= 2 * limit);
        if (rounds == 0)
            CHECK(next == limit);               /* one round proves nothing */
        limit = next;
        rounds++;
    }
    CHECK(limit == MUX_INITIAL_WINDOW + budget);
    CHECK(rounds <= 14);
    for (int i = 0; i < 3; i++) {
        moved = wan_round(&p, st, ce, src, 65536, true);
        CHECK(moved + limit / 4 >= limit && moved <= limit);
    }
    CHECK(mux_stream_send_window(st) <= MUX_INITIAL_WINDOW + budget);
    CHECK(mux_session_buffer_grown(p.cli) == budget);
    pair_free(&p);

    /* The default budget lets one stream pass the old 2 MiB cap. */
    evbuffer_free(src);
    src = endless();
    pair_init(&p);
    wan_clock(&p);
    st = open_stream(&p, &se, &ce);
    for (int i = 0; i < 16; i++)
        wan_round(&p, st, ce, src, 1u << 20, true);
    CHECK(mux_stream_send_window(st) > (4u << 20));
    CHECK(mux_stream_send_window(st) <= MUX_INITIAL_WINDOW + MUX_SESSION_BUFFER_LIMIT);
    pair_free(&p);

    /* A stalled consumer: the first window arrives and sits; nothing is ever credited. */
    evbuffer_free(src);
    src = endless();
    pair_init(&p);
    wan_clock(&p);
    mux_session_set_buffer_limit(p.cli, budget);
    st = open_stream(&p, &se, &ce);
    for (int i = 0; i < 6; i++)
        wan_round(&p, st, ce, src, 65536, false);
    CHECK(mux_stream_send_window(st) == 0);
    CHECK(evbuffer_get_length(mux_stream_sink(ce->st)) == MUX_INITIAL_WINDOW);
    CHECK(mux_session_buffer_grown(p.cli) == 0);
    pair_free(&p);

    /* A sender with credit to spare (32 KiB per 20 ms round trip): a window takes eight
     * round trips to be used, the window is not what limits it. The first timed round is
     * the shortest seen, so it passes for the round trip: at most two doublings (its own,
     * and the one at twice it), then never again, however fast the consumer. */
    evbuffer_free(src);
    src = endless();
    pair_init(&p);
    wan_clock(&p);
    st = open_stream(&p, &se, &ce);
    for (int i = 0; i < 40; i++) {
        struct evbuffer *little = pattern(32768, 2);
        CHECK(wan_round(&p, st, ce, little, 65536, true) == 32768);
        evbuffer_free(little);
    }
    CHECK(mux_session_buffer_grown(p.cli) <= 3 * MUX_INITIAL_WINDOW);
    size_t settled = mux_session_buffer_grown(p.cli);
    for (int i = 0; i < 80; i++) {
        struct evbuffer *little = pattern(32768, 2);
        CHECK(wan_round(&p, st, ce, little, 65536, true) == 32768);
        evbuffer_free(little);
    }
    CHECK(mux_session_buffer_grown(p.cli) == settled);
    pair_free(&p);

    /* The same sender once a KeepAlive measured the round trip (20 ms): its rounds of
     * eight round trips never pass for window-limited, not even the first. */
    evbuffer_free(src);
    src = endless();
    pair_init(&p);
    wan_clock(&p);
    CHECK(mux_session_send_keepalive(p.cli) == MUX_OK);
    CHECK(mux_session_input(p.srv, p.out_cli) == MUX_OK);
    p.now_us += 20000;
    CHECK(mux_session_input(p.cli, p.out_srv) == MUX_OK);
    CHECK(mux_session_rtt_ms(p.cli) == 20.0);
    st = open_stream(&p, &se, &ce);
    for (int i = 0; i < 80; i++) {
        struct evbuffer *little = pattern(32768, 2);
        CHECK(wan_round(&p, st, ce, little, 65536, true) == 32768);
        evbuffer_free(little);
    }
    CHECK(mux_session_buffer_grown(p.cli) == 0);
    /* ... while a bulk sender on the same session still grows. */
    struct mux_stream *bulk = open_stream(&p, &se2, &ce2);
    for (int i = 0; i < 6; i++)
        wan_round(&p, bulk, ce2, src, 65536, true);
    CHECK(mux_session_buffer_grown(p.cli) > 0);
    pair_free(&p);

    /* Credit goes back once the sink is empty, not only at half a window: a burst drained
     * as 60 % then 40 % is credited in full (the 40 % used to wait for the next burst),
     * and the half-window update in the middle of the burst does not stop the growth. */
    evbuffer_free(src);
    src = endless();
    pair_init(&p);
    wan_clock(&p);
    st = open_stream(&p, &se, &ce);
    for (int round = 0; round < 6; round++) {
        size_t w = mux_stream_send_window(st);
        CHECK(wan_round(&p, st, ce, src, 1u << 30, false) == w);
        struct evbuffer *sink = mux_stream_sink(ce->st);
        size_t first = w * 6 / 10;
        evbuffer_drain(sink, first);
        mux_stream_consumed(ce->st, first);
        evbuffer_drain(sink, w - first);
        mux_stream_consumed(ce->st, w - first);
        CHECK(pump(&p) == 0);
        CHECK(mux_stream_send_window(st) == w || mux_stream_send_window(st) == 2 * w);
        if (round < 2)
            CHECK(mux_stream_send_window(st) == w);
    }
    CHECK(mux_stream_send_window(st) >= 4 * MUX_INITIAL_WINDOW);
    pair_free(&p);

    /* Two fast streams share the budget: their growth together never passes it, and
     * once one ends the other grows into its share. */
    evbuffer_free(src);
    src = endless();
    pair_init(&p);
    wan_clock(&p);
    mux_session_set_buffer_limit(p.cli, budget);
    st = open_stream(&p, &se, &ce);
    struct mux_stream *st2 = open_stream(&p, &se2, &ce2);
    for (int i = 0; i < 24; i++) {
        wan_round(&p, st, ce, src, 65536, true);
        wan_round(&p, st2, ce2, src, 65536, true);
        CHECK(mux_session_buffer_grown(p.cli) <= budget);
        CHECK(mux_stream_send_window(st) + mux_stream_send_window(st2) <=
              2 * MUX_INITIAL_WINDOW + budget);
    }
    CHECK(mux_session_buffer_grown(p.cli) == budget);
    CHECK(mux_stream_send_window(st2) < MUX_INITIAL_WINDOW + budget);
    mux_stream_close(st);
    CHECK(pump(&p) == 0);
    CHECK(ce->st == NULL);
    CHECK(mux_session_buffer_grown(p.cli) < budget);
    evbuffer_free(src);
    src = endless();
    for (int i = 0; i < 24; i++)
        wan_round(&p, st2, ce2, src, 65536, true);
    CHECK(mux_session_buffer_grown(p.cli) == budget);   /* all of it now st2's */
    CHECK(mux_stream_send_window(st2) <= MUX_INITIAL_WINDOW + budget);
    CHECK(mux_stream_send_window(st2) >= (MUX_INITIAL_WINDOW + budget) * 3 / 4);
    pair_free(&p);
    evbuffer_free(src);
}

/* A window grown for a WAN is credited back every MUX_UPDATE_STEP_MAX bytes, not at half
 * or a quarter of it: what the receiver holds back is window the sender cannot use. */
static void test_update_step(void)
{
    struct pair p;
    struct end se, *ce;
    struct evbuffer *src = endless();
    pair_init(&p);
    wan_clock(&p);
    struct mux_stream *st = open_stream(&p, &se, &ce);
    for (int i = 0; i < 40 && mux_stream_send_window(st) < 16 * MUX_UPDATE_STEP_MAX; i++)
        wan_round(&p, st, ce, src, 1u << 20, true);
    size_t w = mux_stream_send_window(st);
    CHECK(w >= 16 * MUX_UPDATE_STEP_MAX);
    evbuffer_free(src);
    src = endless();
    /* One round nobody drains: the whole window waits in the sink. */
    CHECK(wan_round(&p, st, ce, src, 1u << 30, false) == w);
    CHECK(mux_stream_send_window(st) == 0);
    struct evbuffer *sink = mux_stream_sink(ce->st);
    CHECK(evbuffer_get_length(sink) == w);
    /* The consumer lags (bytes still wait): credit goes back every step, so the sender
     * never misses more than one step of what was drained (a half or a quarter of this
     * window would hold back 4 MiB or more), and not in pieces smaller than a step. */
    size_t drained = 0, updates = 0, last = 0;
    while (evbuffer_get_length(sink) > 65536) {
        evbuffer_drain(sink, 65536);
        mux_stream_consumed(ce->st, 65536);
        drained += 65536;
        CHECK(pump(&p) == 0);
        size_t now = mux_stream_send_window(st);
        CHECK(now + MUX_UPDATE_STEP_MAX > drained && now < drained + MUX_UPDATE_STEP_MAX);
        if (now != last)
            updates++;
        last = now;
    }
    size_t steps = drained / MUX_UPDATE_STEP_MAX;
    CHECK(updates + 1 >= steps && updates <= steps + 1);
    size_t rest = evbuffer_get_length(sink);
    evbuffer_drain(sink, rest);
    mux_stream_consumed(ce->st, rest);
    CHECK(pump(&p) == 0);
    /* The last piece, less than a step with the sink empty, waits for more. */
    CHECK(mux_stream_send_window(st) + MUX_UPDATE_STEP_MAX > w);
    pair_free(&p);
    evbuffer_free(src);
}

/* Before Hello, a header announcing more than 4 KiB is refused from the header alone:
 * nothing of the payload needs to arrive (or is buffered). */
static void test_hello_header_limit(void)
{
    struct evbuffer *o = evbuffer_new();
    struct evbuffer *in = evbuffer_new();
    struct mux_session *s = mux_session_new(MUX_ROLE_SERVER, o, NULL, NULL);
    const uint8_t big_hello[] = {0x01, FRAME_HELLO, 0, 0, 0x10, 0x01}; /* 4097 bytes */
    evbuffer_add(in, big_hello, sizeof(big_hello));
    CHECK(mux_session_input(s, in) == MUX_E_PROTOCOL);
    CHECK(strstr(mux_session_error(s), "before Hello") != NULL);
    mux_session_free(s);
    evbuffer_drain(in, evbuffer_get_length(in));

    /* A 4096-byte Hello header is fine: the session waits for the payload. */
    s = mux_session_new(MUX_ROLE_SERVER, o, NULL, NULL);
    const uint8_t max_hello[] = {0x01, FRAME_HELLO, 0, 0, 0x10, 0x00};
    evbuffer_add(in, max_hello, sizeof(max_hello));
    CHECK(mux_session_input(s, in) == MUX_OK);
    CHECK(evbuffer_get_length(in) == sizeof(max_hello));
    mux_session_free(s);
    evbuffer_drain(in, evbuffer_get_length(in));

    /* A 64 KiB Data header before Hello: refused at once too. */
    s = mux_session_new(MUX_ROLE_SERVER, o, NULL, NULL);
    const uint8_t big_data[] = {0x01, FRAME_DATA, 0, 1, 0, 4};
    evbuffer_add(in, big_data, sizeof(big_data));
    CHECK(mux_session_input(s, in) == MUX_E_PROTOCOL);
    mux_session_free(s);
    evbuffer_free(in);
    evbuffer_free(o);
}

/* Any split of the input decodes the same: feed one byte at a time. */
static void test_partial_input(void)
{
    struct pair p;
    struct end se;
    struct end *ce;
    pair_init(&p);
    struct mux_stream *st = open_stream(&p, &se, &ce);
    struct evbuffer *a = pattern(70000, 9);
    CHECK(mux_stream_write(st, a) == 70000);
    struct evbuffer *trickle = evbuffer_new();
    int rc = MUX_OK;
    while (evbuffer_get_length(p.out_srv) > 0 && rc == MUX_OK) {
        evbuffer_remove_buffer(p.out_srv, trickle, 1);
        rc = mux_session_input(p.cli, trickle);
    }
    CHECK(rc == MUX_OK && evbuffer_get_length(trickle) == 0);
    CHECK(ce->data == 70000 && matches_pattern(mux_stream_sink(ce->st), 70000, 9));
    evbuffer_free(trickle);
    evbuffer_free(a);
    pair_free(&p);
}

/* A callback that stops the input leaves the following frames in place. */
static void test_stop(void)
{
    struct pair p;
    memset(&p, 0, sizeof(p));
    p.refuse = true;
    p.out_srv = evbuffer_new();
    p.out_cli = evbuffer_new();
    p.srv = mux_session_new(MUX_ROLE_SERVER, p.out_srv, &srv_cb, &p);
    p.cli = mux_session_new(MUX_ROLE_CLIENT, p.out_cli, &cli_cb, &p);
    const char hello[] = "{\"name\":\"x\",\"token\":\"t\"}";
    CHECK(mux_session_send_json(p.cli, FRAME_HELLO, hello, sizeof(hello) - 1) == MUX_OK);
    CHECK(mux_session_input(p.srv, p.out_cli) == MUX_OK);
    CHECK(p.hellos == 1);
    CHECK(mux_session_send_keepalive(p.srv) == MUX_OK);
    CHECK(mux_session_input(p.cli, p.out_srv) == MUX_STOPPED);
    CHECK(p.hello_responses == 1);
    CHECK(evbuffer_get_length(p.out_srv) == FRAME_HEADER_LEN + 8);
    pair_free(&p);
}

/* Optimistic data: with the flag on both ends the server sends Data right after its
 * ConnectRequest; the client holds it (within the window) until it answers and sets a
 * sink, and drops it with a refused stream, even Data that crossed the refusal. Without
 * the flag (an older client) nothing changes: no Data before the ConnectResponse. */
static void test_early_data(void)
{
    struct pair p;
    struct end se;
    uint8_t buf[FRAME_HEADER_LEN + 64];
    pair_init(&p);
    mux_session_set_early_data(p.srv);
    mux_session_set_early_data(p.cli);
    CHECK(mux_session_early_data(p.srv) && mux_session_early_data(p.cli));

    p.answer = -1; /* the client is still dialling */
    memset(&se, 0, sizeof(se));
    se.st = mux_stream_open(p.srv, "10.0.0.5", 80, &end_cb, &se);
    CHECK(se.st != NULL);
    /* Window plus 1000: the window's worth goes now, the rest waits for a WindowUpdate. */
    struct evbuffer *src = pattern(MUX_INITIAL_WINDOW + 1000, 7);
    CHECK(mux_stream_write(se.st, src) == (int)MUX_INITIAL_WINDOW);
    CHECK(evbuffer_get_length(src) == 1000 && mux_stream_send_window(se.st) == 0);
    CHECK(mux_stream_shut_write(se.st) == MUX_E_STATE); /* ShutWrite waits for the answer */
    CHECK(pump(&p) == 0);
    struct end *ce = &p.cli_ends[(p.ncli - 1) % 8];
    CHECK(ce->data == MUX_INITIAL_WINDOW && se.responses == 0);
    CHECK(mux_stream_recv_window(ce->st) == 0);
    /* Draining before the answer sends no WindowUpdate (the server would call it an
     * error); the credit waits. */
    struct evbuffer *held = evbuffer_new();
    mux_stream_set_sink(ce->st, held);
    CHECK(matches_pattern(held, MUX_INITIAL_WINDOW, 7));
    evbuffer_drain(held, evbuffer_get_length(held));
    mux_stream_consumed(ce->st, MUX_INITIAL_WINDOW);
    CHECK(evbuffer_get_length(p.out_cli) == 0);

    /* The answer, then the credit on the next drain report, then the rest. */
    CHECK(mux_stream_respond(ce->st, FRAME_STATUS_OK) == MUX_OK);
    CHECK(pump(&p) == 0);
    CHECK(se.responses == 1 && se.status == FRAME_STATUS_OK);
    mux_stream_consumed(ce->st, 0);
    CHECK(pump(&p) == 0);
    CHECK(mux_stream_send_window(se.st) == MUX_INITIAL_WINDOW && se.writable >= 1);
    CHECK(mux_stream_write(se.st, src) == 1000);
    CHECK(pump(&p) == 0);
    CHECK(ce->data == MUX_INITIAL_WINDOW + 1000 && evbuffer_get_length(held) == 1000);
    mux_stream_close(se.st);
    CHECK(pump(&p) == 0);
    CHECK(ce->closed == 1);

    /* A refusal drops what was held; Data sent after it crossed is dropped too. */
    memset(&se, 0, sizeof(se));
    se.st = mux_stream_open(p.srv, "10.0.0.5", 81, &end_cb, &se);
    evbuffer_add(src, "GET / HTTP/1.0\r\n\r\n", 18);
    CHECK(mux_stream_write(se.st, src) == 18);
    CHECK(mux_session_input(p.cli, p.out_srv) == MUX_OK);
    ce = &p.cli_ends[(p.ncli - 1) % 8];
    CHECK(ce->data == 18);
    CHECK(mux_stream_respond(ce->st, FRAME_STATUS_REFUSED) == MUX_OK);
    evbuffer_add(src, "more", 4);
    CHECK(mux_stream_write(se.st, src) == 4); /* before the server saw the refusal */
    CHECK(pump(&p) == 0);
    CHECK(se.responses == 1 && se.status == FRAME_STATUS_REFUSED);
    CHECK(mux_session_stream_count(p.srv) == 0 && mux_session_stream_count(p.cli) == 0);
    /* The server's side is strict as before: Data for a stream it has not seen opened. */
    int n = frame_encode_data(buf, sizeof(buf), 4242, (const uint8_t *)"x", 1);
    evbuffer_add(p.out_cli, buf, (size_t)n);
    CHECK(mux_session_input(p.srv, p.out_cli) == MUX_E_PROTOCOL);
    evbuffer_free(held);
    pair_free(&p);

    /* An older client (no flag on either end): the server sends nothing before the
     * answer, and the client still calls Data for an unanswered stream an error. */
    pair_init(&p);
    p.answer = -1;
    memset(&se, 0, sizeof(se));
    se.st = mux_stream_open(p.srv, "10.0.0.5", 80, &end_cb, &se);
    evbuffer_add(src, "GET", 3);
    CHECK(mux_stream_write(se.st, src) == MUX_E_STATE && evbuffer_get_length(src) == 3);
    CHECK(mux_session_input(p.cli, p.out_srv) == MUX_OK);
    n = frame_encode_data(buf, sizeof(buf), mux_stream_id(se.st), (const uint8_t *)"x", 1);
    CHECK(feed(&p, buf, (size_t)n) == MUX_E_PROTOCOL);
    CHECK(strstr(mux_session_error(p.cli), "unopened") != NULL);
    pair_free(&p);

    /* A client that takes early Data still refuses Data beyond the stream's window. */
    pair_init(&p);
    mux_session_set_early_data(p.cli);
    p.answer = -1;
    memset(&se, 0, sizeof(se));
    se.st = mux_stream_open(p.srv, "10.0.0.5", 80, &end_cb, &se);
    CHECK(mux_session_input(p.cli, p.out_srv) == MUX_OK);
    static uint8_t chunk[FRAME_MAX_DATA];
    static uint8_t frame[FRAME_HEADER_LEN + 4 + FRAME_MAX_DATA];
    int rc = MUX_OK;
    for (int i = 0; i < 5 && rc == MUX_OK; i++) {
        n = frame_encode_data(frame, sizeof(frame), mux_stream_id(se.st), chunk, sizeof(chunk));
        rc = feed(&p, frame, (size_t)n);
    }
    CHECK(rc == MUX_E_PROTOCOL && strstr(mux_session_error(p.cli), "window") != NULL);
    evbuffer_free(src);
    pair_free(&p);
}


/* A zero-copy transport for the tests: stage() reads the socket into memory and send()
 * appends header and bytes to the server's output, as mux_conn.c does with a pipe and
 * the tunnel socket. ready is the transport's "nothing waits to be sent". */
struct fake_splice {
    struct pair *p;
    bool ready;
    uint8_t staged[FRAME_MAX_DATA];
    size_t nstaged;
    int stages, sends;
};

static bool fake_ready(void *arg) { return ((struct fake_splice *)arg)->ready; }

static ssize_t fake_stage(void *arg, int fd, size_t max)
{
    struct fake_splice *f = arg;
    CHECK(f->nstaged == 0 && max <= sizeof(f->staged));
    f->stages++;
    ssize_t n = read(fd, f->staged, max);
    if (n > 0)
        f->nstaged = (size_t)n;
    return n;
}

static void fake_send(void *arg, const uint8_t *hdr, size_t hlen, size_t n)
{
    struct fake_splice *f = arg;
    CHECK(n == f->nstaged);
    f->sends++;
    evbuffer_add(f->p->out_srv, hdr, hlen);
    evbuffer_add(f->p->out_srv, f->staged, n);
    f->nstaged = 0;
}

static const struct mux_splice_ops fake_splice_ops = {
    .ready = fake_ready, .stage = fake_stage, .send = fake_send,
};

/* Moves what the socket holds with mux_stream_splice until it says why it stopped. */
static enum mux_splice_result splice_all(struct mux_stream *st, int fd, size_t *total)
{
    enum mux_splice_result r;
    size_t moved;
    *total = 0;
    while ((r = mux_stream_splice(st, fd, &moved)) == MUX_SPLICE_MOVED) {
        CHECK(moved > 0 && moved <= FRAME_MAX_DATA);
        *total += moved;
    }
    return r;
}

static void test_splice(void)
{
    struct pair p;
    struct end se;
    struct end *ce;
    pair_init(&p);
    struct mux_stream *st = open_stream(&p, &se, &ce);
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) == 0);
    size_t moved;
    /* No transport: the caller copies. */
    CHECK(!mux_stream_can_splice(st));
    CHECK(mux_stream_splice(st, sv[1], &moved) == MUX_SPLICE_NONE);

    struct fake_splice f = {.p = &p};
    mux_session_set_splice(p.srv, &fake_splice_ops, &f);
    CHECK(mux_stream_can_splice(st));
    /* Nothing to read. */
    f.ready = true;
    CHECK(mux_stream_splice(st, sv[1], &moved) == MUX_SPLICE_AGAIN && moved == 0);

    /* 100,000 bytes waiting; the transport is busy: the stream waits for it and is woken
     * only once it is ready again. */
    struct evbuffer *a = pattern(100000, 7);
    CHECK(evbuffer_write(a, sv[0]) == 100000);
    f.ready = false;
    CHECK(mux_stream_splice(st, sv[1], &moved) == MUX_SPLICE_BLOCKED && f.stages == 1);
    mux_session_splice_ready(p.srv);
    CHECK(se.writable == 0);
    f.ready = true;
    mux_session_splice_ready(p.srv);
    CHECK(se.writable == 1);
    mux_session_splice_ready(p.srv); /* woken once per wait */
    CHECK(se.writable == 1);

    /* One frame per call. While frames wait in the session output a zero-copy frame
     * would overtake them: the stream is told to copy, not made to wait (copying streams
     * could keep the output from ever emptying). */
    CHECK(mux_stream_splice(st, sv[1], &moved) == MUX_SPLICE_MOVED && moved == FRAME_MAX_DATA);
    CHECK(mux_stream_splice(st, sv[1], &moved) == MUX_SPLICE_COPY);
    CHECK(pump(&p) == 0);
    mux_session_splice_ready(p.srv);
    CHECK(se.writable == 1);
    size_t total;
    CHECK(splice_all(st, sv[1], &total) == MUX_SPLICE_COPY && total == 100000 - FRAME_MAX_DATA);
    CHECK(pump(&p) == 0);
    CHECK(mux_stream_splice(st, sv[1], &moved) == MUX_SPLICE_AGAIN);
    CHECK(ce->data == 100000 && matches_pattern(mux_stream_sink(ce->st), 100000, 7));
    CHECK(mux_stream_send_window(st) == MUX_INITIAL_WINDOW - 100000);
    evbuffer_drain(mux_stream_sink(ce->st), 100000);

    /* The window bounds what leaves: frames stop when it is shut, with the rest of the
     * bytes left in the socket, and the WindowUpdate wakes the stream. */
    struct evbuffer *b = pattern(2 * MUX_INITIAL_WINDOW, 8);
    enum mux_splice_result r = MUX_SPLICE_AGAIN;
    for (int i = 0; i < 1000 && mux_stream_send_window(st) > 0; i++) {
        (void)evbuffer_write(b, sv[0]); /* tops the socket up */
        r = mux_stream_splice(st, sv[1], &moved);
        CHECK(r == MUX_SPLICE_MOVED || r == MUX_SPLICE_COPY || r == MUX_SPLICE_AGAIN);
        if (r == MUX_SPLICE_COPY)
            CHECK(pump(&p) == 0); /* the session's output drains */
    }
    CHECK(mux_stream_send_window(st) == 0);
    CHECK(pump(&p) == 0);
    CHECK(ce->data == MUX_INITIAL_WINDOW);
    int stages = f.stages;
    CHECK(mux_stream_splice(st, sv[1], &moved) == MUX_SPLICE_BLOCKED && f.stages == stages);
    int before = se.writable;
    mux_stream_consumed(ce->st, evbuffer_get_length(mux_stream_sink(ce->st)));
    evbuffer_drain(mux_stream_sink(ce->st), evbuffer_get_length(mux_stream_sink(ce->st)));
    CHECK(pump(&p) == 0);
    CHECK(se.writable > before && mux_stream_send_window(st) > 0);

    /* The socket's FIN. */
    shutdown(sv[0], SHUT_WR);
    size_t more;
    for (int i = 0; i < 64 && (r = splice_all(st, sv[1], &more)) != MUX_SPLICE_EOF; i++) {
        CHECK(pump(&p) == 0);
        mux_stream_consumed(ce->st, evbuffer_get_length(mux_stream_sink(ce->st)));
        evbuffer_drain(mux_stream_sink(ce->st), evbuffer_get_length(mux_stream_sink(ce->st)));
        CHECK(pump(&p) == 0);
    }
    CHECK(r == MUX_SPLICE_EOF);

    /* A shut stream cannot send; a stream waiting for the transport may close (and the
     * session go) while it waits. */
    CHECK(mux_stream_shut_write(st) == MUX_OK);
    CHECK(mux_stream_splice(st, sv[1], &moved) == MUX_SPLICE_STATE);
    struct end se2;
    struct end *ce2;
    struct mux_stream *st2 = open_stream(&p, &se2, &ce2);
    int sv2[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv2) == 0);
    CHECK(write(sv2[0], "x", 1) == 1);
    f.ready = false;
    CHECK(mux_stream_splice(st2, sv2[1], &moved) == MUX_SPLICE_BLOCKED);
    mux_stream_close(st2);
    f.ready = true;
    mux_session_splice_ready(p.srv);
    CHECK(se2.writable == 0);
    close(sv2[0]);
    close(sv2[1]);
    close(sv[0]);
    close(sv[1]);
    evbuffer_free(a);
    evbuffer_free(b);
    pair_free(&p);
}

int main(void)
{
    test_stop();
    test_open_data_close();
    test_frames_follow_chains();
    test_flow_control();
    test_one_byte_window();
    test_output_bound();
    test_refusal_and_race();
    test_close_inside_callback_and_session_free();
    test_keepalive();
    test_protocol_errors();
    test_partial_input();
    test_hello_header_limit();
    test_window_growth_rule();
    test_update_step();
    test_window_autotune();
    test_early_data();
    test_splice();
    return check_summary();
}

/* libFuzzer target for the tunnel session (src/common/mux.c): the input is what a peer
 * sends, fed to a client-role and a server-role session in chunks whose sizes come from
 * the input itself. The application side answers ConnectRequests, drains and gives back
 * window, half-closes and closes streams, so every path the peer can steer is reached.
 * Whatever the bytes, a session must end in MUX_OK/MUX_STOPPED or a clean error, never
 * crash, leak or read out of bounds; the output must stay bounded by the windows. */
#include "mux.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "frame.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct fuzz_app {
    struct mux_stream *open[8];
    int nopen;
    unsigned step;
};

static void fuzz_fail(const char *what)
{
    fprintf(stderr, "fuzz_mux: %s\n", what);
    abort();
}

static void fuzz_forget(struct fuzz_app *app, struct mux_stream *st)
{
    for (int i = 0; i < app->nopen; i++) {
        if (app->open[i] == st) {
            app->open[i] = app->open[--app->nopen];
            return;
        }
    }
}

static void fuzz_on_data(struct mux_stream *st, size_t len, void *arg)
{
    struct fuzz_app *app = arg;
    struct evbuffer *sink = mux_stream_sink(st);
    size_t n = evbuffer_get_length(sink);
    /* Drain only some of it now and then, so windows run out too. */
    if (++app->step % 3 == 0)
        return;
    evbuffer_drain(sink, n);
    mux_stream_consumed(st, n);
}

static void fuzz_on_shut(struct mux_stream *st, void *arg)
{
    struct fuzz_app *app = arg;
    if (++app->step % 2 == 0) {
        fuzz_forget(app, st);
        mux_stream_close(st); /* closing from inside the callback must be safe */
    }
}

static void fuzz_on_close(struct mux_stream *st, enum mux_close_reason why, void *arg)
{
    fuzz_forget(arg, st);
}

static void fuzz_on_response(struct mux_stream *st, uint8_t status, void *arg)
{
    if (status != FRAME_STATUS_OK)
        fuzz_forget(arg, st);
}

static const struct mux_stream_callbacks fuzz_stream_cb = {
    .on_connect_response = fuzz_on_response,
    .on_data = fuzz_on_data,
    .on_shut = fuzz_on_shut,
    .on_close = fuzz_on_close,
};

static void fuzz_on_connect_request(struct mux_session *s, struct mux_stream *st,
                                    const char *host, uint16_t port, void *arg)
{
    struct fuzz_app *app = arg;
    if (strlen(host) > FRAME_MAX_HOST)
        fuzz_fail("host longer than a frame can carry");
    if (port % 4 == 3 || app->nopen == 8) {
        mux_stream_respond(st, FRAME_STATUS_REFUSED);
        return;
    }
    mux_stream_set_callbacks(st, &fuzz_stream_cb, app);
    if (port % 4 == 2)
        return; /* answered never: still pending when the session ends */
    mux_stream_respond(st, FRAME_STATUS_OK);
    app->open[app->nopen++] = st;
}

static int fuzz_on_json(struct mux_session *s, uint8_t type, const char *json, size_t len,
                        void *arg)
{
    return len % 5 == 0 ? MUX_STOPPED : 0;
}

static const struct mux_session_callbacks fuzz_session_cb = {
    .on_connect_request = fuzz_on_connect_request,
    .on_json = fuzz_on_json,
};

/* Some application traffic between chunks: writes, half-closes, closes. */
static void fuzz_app_act(struct fuzz_app *app, struct evbuffer *payload, uint8_t what)
{
    if (app->nopen == 0)
        return;
    struct mux_stream *st = app->open[what % app->nopen];
    switch (what >> 5) {
    case 0:
        fuzz_forget(app, st);
        mux_stream_close(st);
        break;
    case 1:
        mux_stream_shut_write(st);
        break;
    default:
        evbuffer_add(payload, "0123456789abcdef", 16);
        mux_stream_write(st, payload);
        evbuffer_drain(payload, evbuffer_get_length(payload));
        break;
    }
}

static void fuzz_run(enum mux_role role, const uint8_t *data, size_t size)
{
    struct fuzz_app app = {0};
    struct evbuffer *out = evbuffer_new(), *in = evbuffer_new(), *payload = evbuffer_new();
    struct mux_session *s = mux_session_new(role, out, &fuzz_session_cb, &app);
    if (!out || !in || !payload || !s)
        fuzz_fail("allocation");
    mux_session_set_open(s);
    if (role == MUX_ROLE_SERVER) {
        for (uint16_t port = 1; port <= 4; port++) {
            struct mux_stream *st = mux_stream_open(s, "127.0.0.1", port, &fuzz_stream_cb, &app);
            if (st)
                app.open[app.nopen++] = st;
        }
    }
    size_t off = 0;
    int rc = MUX_OK;
    while (off < size && rc == MUX_OK) {
        size_t chunk = 1 + data[off] % 97;
        uint8_t act = data[off++];
        if (chunk > size - off)
            chunk = size - off;
        evbuffer_add(in, data + off, chunk);
        off += chunk;
        rc = mux_session_input(s, in);
        if (rc == MUX_OK)
            fuzz_app_act(&app, payload, act);
        if (evbuffer_get_length(out) > 64u * 1024 * 1024)
            fuzz_fail("output grew without bound");
        evbuffer_drain(out, evbuffer_get_length(out));
        mux_session_output_drained(s);
    }
    if (rc < 0 && mux_session_error(s)[0] == '\0')
        fuzz_fail("fatal error without a reason");
    mux_session_free(s);
    evbuffer_free(payload);
    evbuffer_free(in);
    evbuffer_free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_run(MUX_ROLE_CLIENT, data, size);
    fuzz_run(MUX_ROLE_SERVER, data, size);
    return 0;
}

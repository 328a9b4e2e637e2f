/* Unit tests for the tunnel wire codec (src/common/frame.c, SPEC §4). */
#include "check.h"
#include "frame.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FRAME_BUF_MAX (FRAME_HEADER_LEN + FRAME_MAX_PAYLOAD)

/* Big buffers live here rather than on the stack. */
static uint8_t big_in[FRAME_BUF_MAX];
static uint8_t big_out[FRAME_BUF_MAX];

/* Decodes exactly one whole frame of n bytes and checks nothing is left over. */
static enum frame_result decode_whole(const uint8_t *buf, size_t n, struct frame *f)
{
    size_t consumed = 0;
    enum frame_result r = frame_decode(buf, n, f, &consumed);
    if (r == FRAME_OK)
        CHECK(consumed == n);
    return r;
}

static int bytes_eq(const uint8_t *a, size_t alen, const void *b, size_t blen)
{
    return alen == blen && (alen == 0 || memcmp(a, b, alen) == 0);
}

/* ---- round trips ---- */

static void test_roundtrip_connect_request(void)
{
    uint8_t buf[512];
    struct frame f;
    int n = frame_encode_connect_request(buf, sizeof(buf), 7, 22, NULL);
    CHECK(n == FRAME_HEADER_LEN + 6);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.type == FRAME_CONNECT_REQUEST && f.conn_id == 7 && f.port == 22);
    CHECK(f.host == NULL && f.host_len == 0);

    n = frame_encode_connect_request(buf, sizeof(buf), 7, 22, "");
    CHECK(n == FRAME_HEADER_LEN + 6);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK && f.host == NULL);

    n = frame_encode_connect_request(buf, sizeof(buf), 0xffffffffu, 65535, "db.internal");
    CHECK(n == FRAME_HEADER_LEN + 6 + 1 + 11);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.conn_id == 0xffffffffu && f.port == 65535);
    CHECK(bytes_eq(f.host, f.host_len, "db.internal", 11));

    char host[FRAME_MAX_HOST + 1];
    memset(host, 'h', FRAME_MAX_HOST);
    host[FRAME_MAX_HOST] = '\0';
    n = frame_encode_connect_request(buf, sizeof(buf), 1, 1, host);
    CHECK(n == FRAME_HEADER_LEN + 6 + 1 + FRAME_MAX_HOST);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.conn_id == 1 && f.port == 1 && bytes_eq(f.host, f.host_len, host, FRAME_MAX_HOST));
}

static void test_roundtrip_connect_response(void)
{
    uint8_t buf[64];
    struct frame f;
    for (uint8_t st = 0; st <= FRAME_STATUS_TIMEOUT; st++) {
        int n = frame_encode_connect_response(buf, sizeof(buf), 42, st);
        CHECK(n == FRAME_HEADER_LEN + 5);
        CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
        CHECK(f.type == FRAME_CONNECT_RESPONSE && f.conn_id == 42 && f.status == st);
    }
}

static void test_roundtrip_data(void)
{
    uint8_t buf[64];
    struct frame f;
    int n = frame_encode_data(buf, sizeof(buf), 3, (const uint8_t *)"hello", 5);
    CHECK(n == FRAME_HEADER_LEN + 4 + 5);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.type == FRAME_DATA && f.conn_id == 3 && bytes_eq(f.data, f.data_len, "hello", 5));

    n = frame_encode_data(buf, sizeof(buf), 3, NULL, 0);
    CHECK(n == FRAME_HEADER_LEN + 4);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK && f.conn_id == 3 && f.data_len == 0);

    for (size_t i = 0; i < FRAME_MAX_DATA; i++)
        big_in[i] = (uint8_t)(i * 31 + 7);
    n = frame_encode_data(big_out, sizeof(big_out), 9, big_in, FRAME_MAX_DATA);
    CHECK(n == FRAME_HEADER_LEN + 4 + FRAME_MAX_DATA);
    CHECK(decode_whole(big_out, (size_t)n, &f) == FRAME_OK);
    CHECK(f.conn_id == 9 && bytes_eq(f.data, f.data_len, big_in, FRAME_MAX_DATA));
}

static void test_data_header(void)
{
    uint8_t hdr[16], whole[64];
    int n = frame_encode_data_header(hdr, sizeof(hdr), 5, 3);
    CHECK(n == FRAME_HEADER_LEN + 4);
    int m = frame_encode_data(whole, sizeof(whole), 5, (const uint8_t *)"abc", 3);
    CHECK(m == n + 3 && memcmp(hdr, whole, (size_t)n) == 0);
    CHECK(frame_encode_data_header(hdr, FRAME_HEADER_LEN + 4, 5, FRAME_MAX_DATA) == n);
    CHECK(frame_encode_data_header(hdr, FRAME_HEADER_LEN + 3, 5, 0) == FRAME_E_BUFFER);
    CHECK(frame_encode_data_header(hdr, sizeof(hdr), 5, FRAME_MAX_DATA + 1) == FRAME_E_BUFFER);
    CHECK(frame_encode_data_header(hdr, sizeof(hdr), 0, 1) == FRAME_E_BUFFER);
}

static void test_roundtrip_conn_only(void)
{
    uint8_t buf[32];
    struct frame f;
    int n = frame_encode_close(buf, sizeof(buf), 11);
    CHECK(n == FRAME_HEADER_LEN + 4);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.type == FRAME_CLOSE && f.conn_id == 11);

    n = frame_encode_shut_write(buf, sizeof(buf), 12);
    CHECK(n == FRAME_HEADER_LEN + 4);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.type == FRAME_SHUT_WRITE && f.conn_id == 12);
}

static void test_roundtrip_keepalive(void)
{
    static const uint8_t token[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    uint8_t buf[32];
    struct frame f;
    int n = frame_encode_keepalive(buf, sizeof(buf), NULL);
    CHECK(n == FRAME_HEADER_LEN);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.type == FRAME_KEEPALIVE && f.data_len == 0);

    n = frame_encode_keepalive(buf, sizeof(buf), token);
    CHECK(n == FRAME_HEADER_LEN + 8);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.type == FRAME_KEEPALIVE && bytes_eq(f.data, f.data_len, token, 8));
}

static void test_roundtrip_json(void)
{
    static const char hello[] = "{\"name\":\"edge\",\"token\":\"t\",\"version\":\"0.1.0\"}";
    static const char resp[] = "{\"ok\":true,\"message\":\"\"}";
    uint8_t buf[256];
    struct frame f;
    int n = frame_encode_json(buf, sizeof(buf), FRAME_HELLO, hello, strlen(hello));
    CHECK(n == (int)(FRAME_HEADER_LEN + strlen(hello)));
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.type == FRAME_HELLO && bytes_eq(f.data, f.data_len, hello, strlen(hello)));

    n = frame_encode_json(buf, sizeof(buf), FRAME_HELLO_RESPONSE, resp, strlen(resp));
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.type == FRAME_HELLO_RESPONSE && bytes_eq(f.data, f.data_len, resp, strlen(resp)));

    /* Notice (0x0A): the same JSON rules. */
    static const char notice[] = "{\"event\":\"mappings\",\"mappings\":[]}";
    n = frame_encode_json(buf, sizeof(buf), FRAME_NOTICE, notice, strlen(notice));
    CHECK(n == (int)(FRAME_HEADER_LEN + strlen(notice)) && buf[1] == 0x0A);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.type == FRAME_NOTICE && bytes_eq(f.data, f.data_len, notice, strlen(notice)));
    CHECK(frame_encode_json(buf, sizeof(buf), FRAME_DATA, notice, strlen(notice)) < 0);

    memset(big_in, 'x', 4096);
    n = frame_encode_json(big_out, sizeof(big_out), FRAME_HELLO, (const char *)big_in, 4096);
    CHECK(n == FRAME_HEADER_LEN + 4096);
    CHECK(decode_whole(big_out, (size_t)n, &f) == FRAME_OK && f.data_len == 4096);
}

static void test_roundtrip_window_update(void)
{
    uint8_t buf[32];
    struct frame f;
    int n = frame_encode_window_update(buf, sizeof(buf), 13, 1);
    CHECK(n == FRAME_HEADER_LEN + 8);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK);
    CHECK(f.type == FRAME_WINDOW_UPDATE && f.conn_id == 13 && f.increment == 1);

    n = frame_encode_window_update(buf, sizeof(buf), 13, 1u << 30);
    CHECK(decode_whole(buf, (size_t)n, &f) == FRAME_OK && f.increment == 1u << 30);
}

/* ---- incremental decoding at every split point ---- */

struct expect {
    uint8_t type;
    uint32_t conn_id;
    uint16_t port;
    uint8_t status;
    uint32_t increment;
    const char *host;
    const char *data; /* compared over data_len bytes */
    size_t data_len;
};

static const uint8_t ka_token[8] = {0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3};
static const char hello_json[] = "{\"name\":\"a\",\"token\":\"b\",\"version\":\"1\"}";
static const char data_bytes[] = "GET / HTTP/1.0\r\n\r\n\0binary";

static const struct expect stream_expected[] = {
    {.type = FRAME_HELLO, .data = hello_json, .data_len = sizeof(hello_json) - 1},
    {.type = FRAME_CONNECT_REQUEST, .conn_id = 1, .port = 80, .host = "web"},
    {.type = FRAME_CONNECT_RESPONSE, .conn_id = 1, .status = FRAME_STATUS_OK},
    {.type = FRAME_DATA, .conn_id = 1, .data = data_bytes, .data_len = sizeof(data_bytes)},
    {.type = FRAME_DATA, .conn_id = 1, .data = "", .data_len = 0},
    {.type = FRAME_KEEPALIVE, .data = (const char *)ka_token, .data_len = 8},
    {.type = FRAME_KEEPALIVE},
    {.type = FRAME_WINDOW_UPDATE, .conn_id = 1, .increment = 65536},
    {.type = FRAME_CONNECT_REQUEST, .conn_id = 2, .port = 22},
    {.type = FRAME_SHUT_WRITE, .conn_id = 1},
    {.type = FRAME_CLOSE, .conn_id = 1},
};
#define N_EXPECTED (sizeof(stream_expected) / sizeof(stream_expected[0]))

static int encode_expect(uint8_t *out, size_t cap, const struct expect *e)
{
    const uint8_t *d = (const uint8_t *)e->data;
    switch (e->type) {
    case FRAME_CONNECT_REQUEST:
        return frame_encode_connect_request(out, cap, e->conn_id, e->port, e->host);
    case FRAME_CONNECT_RESPONSE:
        return frame_encode_connect_response(out, cap, e->conn_id, e->status);
    case FRAME_DATA:
        return frame_encode_data(out, cap, e->conn_id, d, e->data_len);
    case FRAME_CLOSE:
        return frame_encode_close(out, cap, e->conn_id);
    case FRAME_SHUT_WRITE:
        return frame_encode_shut_write(out, cap, e->conn_id);
    case FRAME_KEEPALIVE:
        return frame_encode_keepalive(out, cap, e->data_len ? d : NULL);
    case FRAME_WINDOW_UPDATE:
        return frame_encode_window_update(out, cap, e->conn_id, e->increment);
    default:
        return frame_encode_json(out, cap, e->type, e->data, e->data_len);
    }
}

static int frame_matches(const struct frame *f, const struct expect *e)
{
    size_t host_len = e->host ? strlen(e->host) : 0;
    if (f->type != e->type || f->conn_id != e->conn_id || f->port != e->port ||
        f->status != e->status || f->increment != e->increment)
        return 0;
    if (host_len ? !bytes_eq(f->host, f->host_len, e->host, host_len) : f->host != NULL)
        return 0;
    return bytes_eq(f->data, f->data_len, e->data, e->data_len);
}

/* An incremental reader: bytes arrive into acc, whole frames are taken from its front. */
struct reader {
    uint8_t acc[1024];
    size_t len;
    size_t n_frames; /* frames decoded so far */
    int bad;         /* a frame out of order, an error, or too many frames */
};

static void reader_feed(struct reader *rd, const uint8_t *p, size_t n)
{
    memcpy(rd->acc + rd->len, p, n);
    rd->len += n;
    for (;;) {
        struct frame f;
        size_t used = 0;
        enum frame_result r = frame_decode(rd->acc, rd->len, &f, &used);
        if (r == FRAME_NEED_MORE)
            return;
        if (r != FRAME_OK || rd->n_frames >= N_EXPECTED ||
            !frame_matches(&f, &stream_expected[rd->n_frames])) {
            rd->bad = 1;
            return;
        }
        rd->n_frames++;
        memmove(rd->acc, rd->acc + used, rd->len - used);
        rd->len -= used;
    }
}

static size_t build_stream(uint8_t *buf, size_t cap)
{
    size_t len = 0;
    for (size_t i = 0; i < N_EXPECTED; i++) {
        int n = encode_expect(buf + len, cap - len, &stream_expected[i]);
        CHECK(n > 0);
        if (n <= 0)
            return 0;
        len += (size_t)n;
    }
    return len;
}

static int reader_done(const struct reader *rd)
{
    return !rd->bad && rd->n_frames == N_EXPECTED && rd->len == 0;
}

static void test_every_split(void)
{
    uint8_t stream[1024];
    size_t len = build_stream(stream, sizeof(stream));
    CHECK(len > 0);
    int split_ok = 1;
    for (size_t cut = 0; cut <= len; cut++) {
        struct reader rd = {.len = 0};
        reader_feed(&rd, stream, cut);
        reader_feed(&rd, stream + cut, len - cut);
        if (!reader_done(&rd)) {
            fprintf(stderr, "split at %zu: %zu frames, bad=%d\n", cut, rd.n_frames, rd.bad);
            split_ok = 0;
        }
    }
    CHECK(split_ok);

    struct reader rd = {.len = 0};
    for (size_t i = 0; i < len; i++)
        reader_feed(&rd, stream + i, 1);
    CHECK(reader_done(&rd));
}

/* Every strict prefix of a valid frame is "need more", and nothing is consumed. */
static void test_prefixes_need_more(void)
{
    uint8_t stream[1024];
    size_t len = build_stream(stream, sizeof(stream));
    struct frame f;
    size_t used = 12345;
    int all = 1;
    size_t first = FRAME_HEADER_LEN + (sizeof(hello_json) - 1);
    for (size_t n = 0; n < first && n < len; n++)
        all &= frame_decode(stream, n, &f, &used) == FRAME_NEED_MORE;
    CHECK(all);
    CHECK(used == 12345);
}

/* ---- malformed input ---- */

/* Decodes header + payload; both a whole buffer and frame_payload_decode must agree. */
static enum frame_result decode_raw(uint8_t type, const uint8_t *payload, size_t len)
{
    struct frame f;
    size_t used;
    frame_encode_header(big_in, type, (uint32_t)len);
    if (len)
        memcpy(big_in + FRAME_HEADER_LEN, payload, len);
    enum frame_result r = frame_decode(big_in, FRAME_HEADER_LEN + len, &f, &used);
    CHECK(frame_payload_decode(type, payload, len, &f) == r);
    return r;
}

static void test_header_errors(void)
{
    uint8_t h[FRAME_HEADER_LEN];
    struct frame f;
    struct frame_header fh;
    size_t used;
    frame_encode_header(h, FRAME_DATA, 4);
    h[0] = 0x02;
    CHECK(frame_decode(h, sizeof(h), &f, &used) == FRAME_E_VERSION);
    CHECK(frame_header_decode(h, &fh) == FRAME_E_VERSION);
    h[0] = 0x00;
    CHECK(frame_decode(h, sizeof(h), &f, &used) == FRAME_E_VERSION);

    frame_encode_header(h, 0x00, 0);
    CHECK(frame_decode(h, sizeof(h), &f, &used) == FRAME_E_TYPE);
    frame_encode_header(h, 0x0b, 0);
    CHECK(frame_decode(h, sizeof(h), &f, &used) == FRAME_E_TYPE);
    frame_encode_header(h, 0xff, 0);
    CHECK(frame_header_decode(h, &fh) == FRAME_E_TYPE);

    /* Length errors come from the header alone: only 6 bytes are there. */
    frame_encode_header(h, FRAME_DATA, FRAME_MAX_PAYLOAD + 1);
    CHECK(frame_decode(h, sizeof(h), &f, &used) == FRAME_E_LENGTH);
    frame_encode_header(h, FRAME_DATA, 0xffffffffu);
    CHECK(frame_decode(h, sizeof(h), &f, &used) == FRAME_E_LENGTH);
    frame_encode_header(h, FRAME_DATA, FRAME_MAX_PAYLOAD);
    CHECK(frame_decode(h, sizeof(h), &f, &used) == FRAME_NEED_MORE);
    CHECK(frame_header_decode(h, &fh) == FRAME_OK);
    CHECK(fh.type == FRAME_DATA && fh.length == FRAME_MAX_PAYLOAD);
    /* Five bytes are not a header yet, whatever they hold. */
    h[0] = 0x7f;
    CHECK(frame_decode(h, 5, &f, &used) == FRAME_NEED_MORE);
}

static void test_bad_connect_request(void)
{
    /* conn_id 1, port 22, host "ab" */
    static const uint8_t ok[] = {0, 0, 0, 1, 0, 22, 2, 'a', 'b'};
    uint8_t p[16];
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, ok, sizeof(ok)) == FRAME_OK);
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, ok, 6) == FRAME_OK);
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, ok, 5) == FRAME_E_PAYLOAD);
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, ok, 0) == FRAME_E_PAYLOAD);
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, ok, 7) == FRAME_E_PAYLOAD); /* len, no bytes */
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, ok, 8) == FRAME_E_PAYLOAD); /* short host */
    memcpy(p, ok, sizeof(ok));
    p[sizeof(ok)] = 'c';
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, p, sizeof(ok) + 1) == FRAME_E_PAYLOAD); /* trailing */
    memcpy(p, ok, sizeof(ok));
    p[6] = 0;
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, p, 7) == FRAME_E_PAYLOAD); /* host len 0 */
    memcpy(p, ok, sizeof(ok));
    p[4] = p[5] = 0;
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, p, sizeof(ok)) == FRAME_E_PAYLOAD); /* port 0 */
    memcpy(p, ok, sizeof(ok));
    p[3] = 0;
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, p, sizeof(ok)) == FRAME_E_PAYLOAD); /* conn 0 */
    memcpy(p, ok, sizeof(ok));
    p[8] = '\0';
    CHECK(decode_raw(FRAME_CONNECT_REQUEST, p, sizeof(ok)) == FRAME_E_PAYLOAD); /* NUL */
}

static void test_bad_fixed_sizes(void)
{
    static const uint8_t p[16] = {0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0};
    static const uint8_t zero[16] = {0};
    static const uint8_t st4[5] = {0, 0, 0, 1, 4};
    static const uint8_t st3[5] = {0, 0, 0, 1, 3};
    CHECK(decode_raw(FRAME_CONNECT_RESPONSE, st3, 5) == FRAME_OK);
    CHECK(decode_raw(FRAME_CONNECT_RESPONSE, st4, 5) == FRAME_E_PAYLOAD);
    CHECK(decode_raw(FRAME_CONNECT_RESPONSE, p, 4) == FRAME_E_PAYLOAD);
    CHECK(decode_raw(FRAME_CONNECT_RESPONSE, p, 6) == FRAME_E_PAYLOAD);
    CHECK(decode_raw(FRAME_CONNECT_RESPONSE, zero, 5) == FRAME_E_PAYLOAD);
    static const uint8_t conn_only[] = {FRAME_CLOSE, FRAME_SHUT_WRITE};
    for (size_t i = 0; i < 2; i++) {
        uint8_t t = conn_only[i];
        CHECK(decode_raw(t, p, 4) == FRAME_OK);
        CHECK(decode_raw(t, p, 3) == FRAME_E_PAYLOAD);
        CHECK(decode_raw(t, p, 5) == FRAME_E_PAYLOAD);
        CHECK(decode_raw(t, p, 0) == FRAME_E_PAYLOAD);
        CHECK(decode_raw(t, zero, 4) == FRAME_E_PAYLOAD);
    }
    for (size_t n = 0; n <= 16; n++)
        CHECK(decode_raw(FRAME_KEEPALIVE, p, n) == (n == 0 || n == 8 ? FRAME_OK : FRAME_E_PAYLOAD));
}

static void test_bad_window_update(void)
{
    uint8_t p[9] = {0, 0, 0, 1, 0x40, 0, 0, 0, 0};
    CHECK(decode_raw(FRAME_WINDOW_UPDATE, p, 8) == FRAME_OK);
    CHECK(decode_raw(FRAME_WINDOW_UPDATE, p, 7) == FRAME_E_PAYLOAD);
    CHECK(decode_raw(FRAME_WINDOW_UPDATE, p, 9) == FRAME_E_PAYLOAD);
    p[7] = 1; /* (1 << 30) + 1 */
    CHECK(decode_raw(FRAME_WINDOW_UPDATE, p, 8) == FRAME_E_PAYLOAD);
    memset(p + 4, 0xff, 4);
    CHECK(decode_raw(FRAME_WINDOW_UPDATE, p, 8) == FRAME_E_PAYLOAD);
    memset(p + 4, 0, 4);
    CHECK(decode_raw(FRAME_WINDOW_UPDATE, p, 8) == FRAME_E_PAYLOAD); /* increment 0 */
    p[7] = 1;
    p[3] = 0;
    CHECK(decode_raw(FRAME_WINDOW_UPDATE, p, 8) == FRAME_E_PAYLOAD); /* conn 0 */
}

static void test_bad_data(void)
{
    memset(big_out, 0xab, sizeof(big_out));
    big_out[0] = big_out[1] = big_out[2] = 0;
    big_out[3] = 1;
    CHECK(decode_raw(FRAME_DATA, big_out, 4 + FRAME_MAX_DATA) == FRAME_OK);
    CHECK(decode_raw(FRAME_DATA, big_out, 4 + FRAME_MAX_DATA + 1) == FRAME_E_PAYLOAD);
    CHECK(decode_raw(FRAME_DATA, big_out, FRAME_MAX_PAYLOAD) == FRAME_E_PAYLOAD);
    CHECK(decode_raw(FRAME_DATA, big_out, 4) == FRAME_OK);
    CHECK(decode_raw(FRAME_DATA, big_out, 3) == FRAME_E_PAYLOAD);
    CHECK(decode_raw(FRAME_DATA, big_out, 0) == FRAME_E_PAYLOAD);
    big_out[3] = 0;
    CHECK(decode_raw(FRAME_DATA, big_out, 10) == FRAME_E_PAYLOAD); /* conn 0 */
}

static void test_bad_json(void)
{
    memset(big_out, '{', 4097);
    for (uint8_t t = FRAME_HELLO; t <= FRAME_HELLO_RESPONSE; t++) {
        CHECK(decode_raw(t, big_out, 0) == FRAME_E_PAYLOAD);
        CHECK(decode_raw(t, big_out, 1) == FRAME_OK);
        CHECK(decode_raw(t, big_out, 4096) == FRAME_OK);
        CHECK(decode_raw(t, big_out, 4097) == FRAME_E_PAYLOAD);
    }
    CHECK(decode_raw(FRAME_HELLO, (const uint8_t *)"{\"a\0\":1}", 8) == FRAME_E_PAYLOAD);
    CHECK(decode_raw(FRAME_HELLO_RESPONSE, (const uint8_t *)"{}\0", 3) == FRAME_E_PAYLOAD);
}

/* ---- encoder limits ---- */

static void test_encoder_buffer(void)
{
    static const uint8_t token[8] = {0};
    uint8_t buf[FRAME_HEADER_LEN + 6 + 1 + FRAME_MAX_HOST + 1];
    CHECK(frame_encode_connect_request(buf, FRAME_HEADER_LEN + 5, 1, 1, NULL) == FRAME_E_BUFFER);
    CHECK(frame_encode_connect_request(buf, FRAME_HEADER_LEN + 6, 1, 1, NULL) == 12);
    CHECK(frame_encode_connect_request(buf, FRAME_HEADER_LEN + 8, 1, 1, "ab") == FRAME_E_BUFFER);
    CHECK(frame_encode_connect_request(buf, FRAME_HEADER_LEN + 9, 1, 1, "ab") == 15);
    CHECK(frame_encode_connect_response(buf, 10, 1, 0) == FRAME_E_BUFFER);
    CHECK(frame_encode_data(buf, 12, 1, (const uint8_t *)"abc", 3) == FRAME_E_BUFFER);
    CHECK(frame_encode_data(buf, 13, 1, (const uint8_t *)"abc", 3) == 13);
    CHECK(frame_encode_close(buf, 9, 1) == FRAME_E_BUFFER);
    CHECK(frame_encode_shut_write(buf, 9, 1) == FRAME_E_BUFFER);
    CHECK(frame_encode_keepalive(buf, 5, NULL) == FRAME_E_BUFFER);
    CHECK(frame_encode_keepalive(buf, 13, token) == FRAME_E_BUFFER);
    CHECK(frame_encode_json(buf, 7, FRAME_HELLO, "{}", 2) == FRAME_E_BUFFER);
    CHECK(frame_encode_json(buf, 8, FRAME_HELLO, "{}", 2) == 8);
    CHECK(frame_encode_window_update(buf, 13, 1, 1) == FRAME_E_BUFFER);
    CHECK(frame_encode_close(buf, 0, 1) == FRAME_E_BUFFER);
}

static void test_encoder_ranges(void)
{
    uint8_t buf[512];
    char host[FRAME_MAX_HOST + 2];
    memset(host, 'a', sizeof(host) - 1);
    host[sizeof(host) - 1] = '\0';
    CHECK(frame_encode_connect_request(buf, sizeof(buf), 1, 1, host) == FRAME_E_BUFFER);
    CHECK(frame_encode_connect_request(buf, sizeof(buf), 1, 0, NULL) == FRAME_E_BUFFER);
    CHECK(frame_encode_connect_request(buf, sizeof(buf), 0, 1, NULL) == FRAME_E_BUFFER);
    CHECK(frame_encode_connect_response(buf, sizeof(buf), 1, 4) == FRAME_E_BUFFER);
    CHECK(frame_encode_connect_response(buf, sizeof(buf), 0, 0) == FRAME_E_BUFFER);
    CHECK(frame_encode_data(big_out, sizeof(big_out), 1, big_in, FRAME_MAX_DATA + 1) ==
          FRAME_E_BUFFER);
    CHECK(frame_encode_data(buf, sizeof(buf), 1, NULL, 1) == FRAME_E_BUFFER);
    CHECK(frame_encode_data(buf, sizeof(buf), 0, NULL, 0) == FRAME_E_BUFFER);
    CHECK(frame_encode_close(buf, sizeof(buf), 0) == FRAME_E_BUFFER);
    CHECK(frame_encode_shut_write(buf, sizeof(buf), 0) == FRAME_E_BUFFER);
    CHECK(frame_encode_json(buf, sizeof(buf), FRAME_DATA, "{}", 2) == FRAME_E_BUFFER);
    CHECK(frame_encode_json(buf, sizeof(buf), FRAME_HELLO, "", 0) == FRAME_E_BUFFER);
    CHECK(frame_encode_json(buf, sizeof(buf), FRAME_HELLO, NULL, 2) == FRAME_E_BUFFER);
    CHECK(frame_encode_json(buf, sizeof(buf), FRAME_HELLO, "{\0}", 3) == FRAME_E_BUFFER);
    memset(big_in, ' ', 4097);
    CHECK(frame_encode_json(big_out, sizeof(big_out), FRAME_HELLO, (const char *)big_in, 4097) ==
          FRAME_E_BUFFER);
    CHECK(frame_encode_window_update(buf, sizeof(buf), 1, 0) == FRAME_E_BUFFER);
    CHECK(frame_encode_window_update(buf, sizeof(buf), 1, (1u << 30) + 1) == FRAME_E_BUFFER);
    CHECK(frame_encode_window_update(buf, sizeof(buf), 0, 1) == FRAME_E_BUFFER);
}

static void test_result_names(void)
{
    CHECK(strcmp(frame_result_name(FRAME_OK), "ok") == 0);
    CHECK(strcmp(frame_result_name(FRAME_NEED_MORE), "need more") == 0);
    CHECK(strcmp(frame_result_name(FRAME_E_VERSION), "bad version") == 0);
    CHECK(strcmp(frame_result_name(FRAME_E_TYPE), "unknown type") == 0);
    CHECK(strcmp(frame_result_name(FRAME_E_LENGTH), "length over limit") == 0);
    CHECK(strcmp(frame_result_name(FRAME_E_PAYLOAD), "malformed payload") == 0);
    CHECK(strcmp(frame_result_name(FRAME_E_BUFFER), "buffer too small") == 0);
    CHECK(frame_result_name((enum frame_result)-99) != NULL);
}

int main(void)
{
    test_roundtrip_connect_request();
    test_roundtrip_connect_response();
    test_roundtrip_data();
    test_data_header();
    test_roundtrip_conn_only();
    test_roundtrip_keepalive();
    test_roundtrip_json();
    test_roundtrip_window_update();
    test_every_split();
    test_prefixes_need_more();
    test_header_errors();
    test_bad_connect_request();
    test_bad_fixed_sizes();
    test_bad_window_update();
    test_bad_data();
    test_bad_json();
    test_encoder_buffer();
    test_encoder_ranges();
    test_result_names();
    return check_summary();
}

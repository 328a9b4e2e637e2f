/* libFuzzer target for the tunnel wire codec: decode frames from the input until an error
 * or "need more", and check that every decoded frame re-encodes to exactly the bytes it was
 * decoded from. Any difference is a codec bug, so it aborts. */
#include "frame.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fuzz_fail(const char *what)
{
    fprintf(stderr, "fuzz_frame: %s\n", what);
    abort();
}

/* Encodes f again with the encoder for its type. */
static int fuzz_reencode(const struct frame *f, uint8_t *out, size_t cap)
{
    char host[FRAME_MAX_HOST + 1];
    switch (f->type) {
    case FRAME_CONNECT_REQUEST:
        if (f->host == NULL)
            return frame_encode_connect_request(out, cap, f->conn_id, f->port, NULL);
        memcpy(host, f->host, f->host_len);
        host[f->host_len] = '\0';
        return frame_encode_connect_request(out, cap, f->conn_id, f->port, host);
    case FRAME_CONNECT_RESPONSE:
        return frame_encode_connect_response(out, cap, f->conn_id, f->status);
    case FRAME_DATA:
        return frame_encode_data(out, cap, f->conn_id, f->data, f->data_len);
    case FRAME_CLOSE:
        return frame_encode_close(out, cap, f->conn_id);
    case FRAME_KEEPALIVE:
        return frame_encode_keepalive(out, cap, f->data_len ? f->data : NULL);
    case FRAME_HELLO:
    case FRAME_HELLO_RESPONSE:
    case FRAME_NOTICE:
        return frame_encode_json(out, cap, f->type, (const char *)f->data, f->data_len);
    case FRAME_WINDOW_UPDATE:
        return frame_encode_window_update(out, cap, f->conn_id, f->increment);
    case FRAME_SHUT_WRITE:
        return frame_encode_shut_write(out, cap, f->conn_id);
    }
    fuzz_fail("decoded an unknown type");
    return -1;
}

static void fuzz_check_frame(const uint8_t *buf, size_t used, const struct frame *f)
{
    static uint8_t out[FRAME_HEADER_LEN + FRAME_MAX_PAYLOAD];
    int n = fuzz_reencode(f, out, sizeof(out));
    if (n < 0 || (size_t)n != used || memcmp(out, buf, used) != 0)
        fuzz_fail("re-encoded frame differs from the decoded bytes");
    /* Encoders must also respect a buffer one byte too small. */
    if (fuzz_reencode(f, out, used - 1) != FRAME_E_BUFFER)
        fuzz_fail("encoder ignored cap");
    if (f->type == FRAME_DATA &&
        (frame_encode_data_header(out, sizeof(out), f->conn_id, f->data_len) !=
             FRAME_HEADER_LEN + 4 ||
         memcmp(out, buf, FRAME_HEADER_LEN + 4) != 0))
        fuzz_fail("data header differs");
    /* The decoder must wait for the last byte, never decode a frame early. */
    struct frame g;
    size_t g_used;
    if (frame_decode(buf, used - 1, &g, &g_used) != FRAME_NEED_MORE)
        fuzz_fail("strict prefix of a frame was not need-more");
}

/* A header error must show with the 6 header bytes alone; a payload error only later. */
static void fuzz_check_error(const uint8_t *buf, size_t len, enum frame_result r)
{
    struct frame_header h;
    struct frame g;
    size_t g_used;
    if (frame_result_name(r) == NULL || len < FRAME_HEADER_LEN)
        fuzz_fail("bad error result");
    enum frame_result hr = frame_header_decode(buf, &h);
    if (r == FRAME_E_PAYLOAD ? hr != FRAME_OK : hr != r)
        fuzz_fail("header decode disagrees with frame decode");
    enum frame_result r6 = frame_decode(buf, FRAME_HEADER_LEN, &g, &g_used);
    if (r6 != (r == FRAME_E_PAYLOAD && h.length > 0 ? FRAME_NEED_MORE : r))
        fuzz_fail("error not reported from the header alone");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t off = 0;
    for (;;) {
        struct frame f;
        size_t used = 0;
        enum frame_result r = frame_decode(data + off, size - off, &f, &used);
        if (r == FRAME_NEED_MORE)
            break;
        if (r != FRAME_OK) {
            fuzz_check_error(data + off, size - off, r);
            break;
        }
        if (used < FRAME_HEADER_LEN || used > size - off)
            fuzz_fail("consumed out of range");
        fuzz_check_frame(data + off, used, &f);
        off += used;
    }
    return 0;
}

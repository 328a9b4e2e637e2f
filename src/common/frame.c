/* Tunnel wire codec (SPEC §4). Every number from the peer is range-checked here, so the
 * tunnel code only ever sees frames that make sense. */
#include "frame.h"

#include <string.h>

#define FRAME_MAX_INCREMENT (UINT32_C(1) << 30)
#define FRAME_KEEPALIVE_TOKEN_LEN 8
/* conn_id u32 + port u16: a ConnectRequest without the optional host. */
#define FRAME_CONNECT_FIXED_LEN 6

static uint32_t frame_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static uint16_t frame_get_u16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static void frame_put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void frame_put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

enum frame_result frame_header_decode(const uint8_t hdr[FRAME_HEADER_LEN],
                                      struct frame_header *out)
{
    if (hdr[0] != FRAME_VERSION)
        return FRAME_E_VERSION;
    if (hdr[1] < FRAME_CONNECT_REQUEST || hdr[1] > FRAME_NOTICE)
        return FRAME_E_TYPE;
    uint32_t length = frame_get_u32(hdr + 2);
    if (length > FRAME_MAX_PAYLOAD)
        return FRAME_E_LENGTH;
    out->type = hdr[1];
    out->length = length;
    return FRAME_OK;
}

/* Reads the conn_id every stream frame starts with; 0 is never a stream (ids start at 1). */
static enum frame_result frame_take_conn_id(const uint8_t *payload, size_t len, struct frame *out)
{
    if (len < 4)
        return FRAME_E_PAYLOAD;
    out->conn_id = frame_get_u32(payload);
    return out->conn_id == 0 ? FRAME_E_PAYLOAD : FRAME_OK;
}

/* Host names travel as C strings after decoding (resolver, allow-list): an embedded NUL
 * would make the name checked differ from the name dialled. */
static int frame_has_nul(const uint8_t *p, size_t len) { return memchr(p, 0, len) != NULL; }

static enum frame_result frame_decode_connect_request(const uint8_t *p, size_t len,
                                                      struct frame *out)
{
    if (len < FRAME_CONNECT_FIXED_LEN || frame_take_conn_id(p, len, out) != FRAME_OK)
        return FRAME_E_PAYLOAD;
    out->port = frame_get_u16(p + 4);
    if (out->port == 0)
        return FRAME_E_PAYLOAD;
    if (len == FRAME_CONNECT_FIXED_LEN)
        return FRAME_OK;
    size_t host_len = p[FRAME_CONNECT_FIXED_LEN];
    const uint8_t *host = p + FRAME_CONNECT_FIXED_LEN + 1;
    if (host_len == 0 || len != FRAME_CONNECT_FIXED_LEN + 1 + host_len ||
        frame_has_nul(host, host_len))
        return FRAME_E_PAYLOAD;
    out->host = host;
    out->host_len = host_len;
    return FRAME_OK;
}

static enum frame_result frame_decode_connect_response(const uint8_t *p, size_t len,
                                                       struct frame *out)
{
    if (len != 5 || frame_take_conn_id(p, len, out) != FRAME_OK)
        return FRAME_E_PAYLOAD;
    out->status = p[4];
    return out->status <= FRAME_STATUS_TIMEOUT ? FRAME_OK : FRAME_E_PAYLOAD;
}

static enum frame_result frame_decode_data(const uint8_t *p, size_t len, struct frame *out)
{
    if (frame_take_conn_id(p, len, out) != FRAME_OK || len - 4 > FRAME_MAX_DATA)
        return FRAME_E_PAYLOAD;
    out->data = p + 4;
    out->data_len = len - 4;
    return FRAME_OK;
}

/* Close and ShutWrite: conn_id only. */
static enum frame_result frame_decode_conn_only(const uint8_t *p, size_t len, struct frame *out)
{
    if (len != 4)
        return FRAME_E_PAYLOAD;
    return frame_take_conn_id(p, len, out);
}

static enum frame_result frame_decode_keepalive(const uint8_t *p, size_t len, struct frame *out)
{
    if (len != 0 && len != FRAME_KEEPALIVE_TOKEN_LEN)
        return FRAME_E_PAYLOAD;
    out->data = len ? p : NULL;
    out->data_len = len;
    return FRAME_OK;
}

static int frame_json_ok(const uint8_t *p, size_t len)
{
    return len >= 1 && len <= FRAME_MAX_JSON && !frame_has_nul(p, len);
}

static enum frame_result frame_decode_json(const uint8_t *p, size_t len, struct frame *out)
{
    if (!frame_json_ok(p, len))
        return FRAME_E_PAYLOAD;
    out->data = p;
    out->data_len = len;
    return FRAME_OK;
}

static enum frame_result frame_decode_window_update(const uint8_t *p, size_t len,
                                                    struct frame *out)
{
    if (len != 8 || frame_take_conn_id(p, len, out) != FRAME_OK)
        return FRAME_E_PAYLOAD;
    out->increment = frame_get_u32(p + 4);
    if (out->increment == 0 || out->increment > FRAME_MAX_INCREMENT)
        return FRAME_E_PAYLOAD;
    return FRAME_OK;
}

enum frame_result frame_payload_decode(uint8_t type, const uint8_t *payload, size_t len,
                                       struct frame *out)
{
    memset(out, 0, sizeof(*out));
    out->type = type;
    switch (type) {
    case FRAME_CONNECT_REQUEST:
        return frame_decode_connect_request(payload, len, out);
    case FRAME_CONNECT_RESPONSE:
        return frame_decode_connect_response(payload, len, out);
    case FRAME_DATA:
        return frame_decode_data(payload, len, out);
    case FRAME_CLOSE:
    case FRAME_SHUT_WRITE:
        return frame_decode_conn_only(payload, len, out);
    case FRAME_KEEPALIVE:
        return frame_decode_keepalive(payload, len, out);
    case FRAME_HELLO:
    case FRAME_HELLO_RESPONSE:
    case FRAME_NOTICE:
        return frame_decode_json(payload, len, out);
    case FRAME_WINDOW_UPDATE:
        return frame_decode_window_update(payload, len, out);
    default:
        return FRAME_E_PAYLOAD;
    }
}

enum frame_result frame_decode(const uint8_t *buf, size_t len, struct frame *out,
                               size_t *consumed)
{
    struct frame_header hdr;
    if (len < FRAME_HEADER_LEN)
        return FRAME_NEED_MORE;
    enum frame_result r = frame_header_decode(buf, &hdr);
    if (r != FRAME_OK)
        return r;
    if (len - FRAME_HEADER_LEN < hdr.length)
        return FRAME_NEED_MORE;
    r = frame_payload_decode(hdr.type, buf + FRAME_HEADER_LEN, hdr.length, out);
    if (r != FRAME_OK)
        return r;
    *consumed = FRAME_HEADER_LEN + (size_t)hdr.length;
    return FRAME_OK;
}

void frame_encode_header(uint8_t out[FRAME_HEADER_LEN], uint8_t type, uint32_t length)
{
    out[0] = FRAME_VERSION;
    out[1] = type;
    frame_put_u32(out + 2, length);
}

/* Writes the header and the conn_id, the start of every stream frame. Returns the whole
 * frame's size, or FRAME_E_BUFFER when it would not fit in cap or conn_id is 0. */
static int frame_begin_stream(uint8_t *out, size_t cap, uint8_t type, uint32_t conn_id,
                              size_t payload_len)
{
    size_t total = FRAME_HEADER_LEN + payload_len;
    if (conn_id == 0 || payload_len > FRAME_MAX_PAYLOAD || out == NULL || cap < total)
        return FRAME_E_BUFFER;
    frame_encode_header(out, type, (uint32_t)payload_len);
    frame_put_u32(out + FRAME_HEADER_LEN, conn_id);
    return (int)total;
}

int frame_encode_connect_request(uint8_t *out, size_t cap, uint32_t conn_id, uint16_t port,
                                 const char *host)
{
    size_t host_len = host ? strnlen(host, FRAME_MAX_HOST + 1) : 0;
    size_t payload_len = FRAME_CONNECT_FIXED_LEN + (host_len ? 1 + host_len : 0);
    if (port == 0 || host_len > FRAME_MAX_HOST)
        return FRAME_E_BUFFER;
    int n = frame_begin_stream(out, cap, FRAME_CONNECT_REQUEST, conn_id, payload_len);
    if (n < 0)
        return n;
    uint8_t *p = out + FRAME_HEADER_LEN;
    frame_put_u16(p + 4, port);
    if (host_len) {
        p[FRAME_CONNECT_FIXED_LEN] = (uint8_t)host_len;
        memcpy(p + FRAME_CONNECT_FIXED_LEN + 1, host, host_len);
    }
    return n;
}

int frame_encode_connect_response(uint8_t *out, size_t cap, uint32_t conn_id, uint8_t status)
{
    if (status > FRAME_STATUS_TIMEOUT)
        return FRAME_E_BUFFER;
    int n = frame_begin_stream(out, cap, FRAME_CONNECT_RESPONSE, conn_id, 5);
    if (n < 0)
        return n;
    out[FRAME_HEADER_LEN + 4] = status;
    return n;
}

int frame_encode_data_header(uint8_t *out, size_t cap, uint32_t conn_id, size_t data_len)
{
    /* Only the header and conn_id are written here; the data follows in another buffer. */
    if (data_len > FRAME_MAX_DATA || cap < FRAME_HEADER_LEN + 4)
        return FRAME_E_BUFFER;
    int n = frame_begin_stream(out, FRAME_HEADER_LEN + 4 + data_len, FRAME_DATA, conn_id,
                               4 + data_len);
    return n < 0 ? n : FRAME_HEADER_LEN + 4;
}

int frame_encode_data(uint8_t *out, size_t cap, uint32_t conn_id, const uint8_t *data,
                      size_t data_len)
{
    if (data_len > FRAME_MAX_DATA || (data == NULL && data_len > 0))
        return FRAME_E_BUFFER;
    int n = frame_begin_stream(out, cap, FRAME_DATA, conn_id, 4 + data_len);
    if (n < 0)
        return n;
    if (data_len)
        memcpy(out + FRAME_HEADER_LEN + 4, data, data_len);
    return n;
}

int frame_encode_close(uint8_t *out, size_t cap, uint32_t conn_id)
{
    return frame_begin_stream(out, cap, FRAME_CLOSE, conn_id, 4);
}

int frame_encode_keepalive(uint8_t *out, size_t cap, const uint8_t *token)
{
    size_t len = token ? FRAME_KEEPALIVE_TOKEN_LEN : 0;
    if (out == NULL || cap < FRAME_HEADER_LEN + len)
        return FRAME_E_BUFFER;
    frame_encode_header(out, FRAME_KEEPALIVE, (uint32_t)len);
    if (token)
        memcpy(out + FRAME_HEADER_LEN, token, len);
    return (int)(FRAME_HEADER_LEN + len);
}

int frame_encode_json(uint8_t *out, size_t cap, uint8_t type, const char *json,
                      size_t json_len)
{
    if (type != FRAME_HELLO && type != FRAME_HELLO_RESPONSE && type != FRAME_NOTICE)
        return FRAME_E_BUFFER;
    /* The decoder rejects what it could not hand on, so the encoder never produces it. */
    if (json == NULL || !frame_json_ok((const uint8_t *)json, json_len))
        return FRAME_E_BUFFER;
    if (out == NULL || cap < FRAME_HEADER_LEN + json_len)
        return FRAME_E_BUFFER;
    frame_encode_header(out, type, (uint32_t)json_len);
    memcpy(out + FRAME_HEADER_LEN, json, json_len);
    return (int)(FRAME_HEADER_LEN + json_len);
}

int frame_encode_window_update(uint8_t *out, size_t cap, uint32_t conn_id, uint32_t increment)
{
    if (increment == 0 || increment > FRAME_MAX_INCREMENT)
        return FRAME_E_BUFFER;
    int n = frame_begin_stream(out, cap, FRAME_WINDOW_UPDATE, conn_id, 8);
    if (n < 0)
        return n;
    frame_put_u32(out + FRAME_HEADER_LEN + 4, increment);
    return n;
}

int frame_encode_shut_write(uint8_t *out, size_t cap, uint32_t conn_id)
{
    return frame_begin_stream(out, cap, FRAME_SHUT_WRITE, conn_id, 4);
}

const char *frame_result_name(enum frame_result r)
{
    switch (r) {
    case FRAME_OK:
        return "ok";
    case FRAME_NEED_MORE:
        return "need more";
    case FRAME_E_VERSION:
        return "bad version";
    case FRAME_E_TYPE:
        return "unknown type";
    case FRAME_E_LENGTH:
        return "length over limit";
    case FRAME_E_PAYLOAD:
        return "malformed payload";
    case FRAME_E_BUFFER:
        return "buffer too small";
    }
    return "unknown result";
}

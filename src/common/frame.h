/* Tunnel wire codec (SPEC §4). Pure: bytes in, frames out; no sockets, no libevent,
 * no logging, so it is unit-tested on every split point and fuzzed.
 *
 * Frame: | version 1B = 0x01 | type 1B | length 4B big-endian | payload (length bytes) |
 */
#ifndef PORTMUX_FRAME_H
#define PORTMUX_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define FRAME_VERSION 0x01
#define FRAME_HEADER_LEN 6
#define FRAME_MAX_PAYLOAD (65536 + 8)
/* Most Data bytes one frame carries (payload = conn_id + bytes). */
#define FRAME_MAX_DATA 65536
/* Room for a ConnectRequest: conn_id, port, host length, host. */
#define FRAME_MAX_HOST 255
/* Hello/HelloResponse JSON bodies are small; a bigger one is an attack, not a greeting. */
#define FRAME_MAX_JSON 4096

enum frame_type {
    FRAME_CONNECT_REQUEST = 0x01,
    FRAME_CONNECT_RESPONSE = 0x02,
    FRAME_DATA = 0x03,
    FRAME_CLOSE = 0x04,
    FRAME_KEEPALIVE = 0x05,
    FRAME_HELLO = 0x06,
    FRAME_HELLO_RESPONSE = 0x07,
    FRAME_WINDOW_UPDATE = 0x08,
    FRAME_SHUT_WRITE = 0x09,
    /* Server -> client JSON after HelloResponse, only to a client whose Hello said
     * "notices": true (older clients never get one). */
    FRAME_NOTICE = 0x0A,
};

enum frame_connect_status {
    FRAME_STATUS_OK = 0,
    FRAME_STATUS_REFUSED = 1,
    FRAME_STATUS_NOT_ALLOWED = 2,
    FRAME_STATUS_TIMEOUT = 3,
};

/* Decoder results: > 0 never; 0 = a whole frame; negatives below. */
enum frame_result {
    FRAME_OK = 0,
    FRAME_NEED_MORE = -1,       /* not an error: feed more bytes */
    FRAME_E_VERSION = -2,       /* version byte is not 0x01 */
    FRAME_E_TYPE = -3,          /* unknown type */
    FRAME_E_LENGTH = -4,        /* length over FRAME_MAX_PAYLOAD */
    FRAME_E_PAYLOAD = -5,       /* payload malformed for its type */
    FRAME_E_BUFFER = -6,        /* encoder: output buffer too small or argument out of range */
};

struct frame_header {
    uint8_t type;
    uint32_t length;
};

/* A decoded frame. Pointers point into the caller's input buffer (no copies). */
struct frame {
    uint8_t type;
    uint32_t conn_id;          /* CONNECT_*, DATA, CLOSE, WINDOW_UPDATE, SHUT_WRITE */
    uint16_t port;             /* CONNECT_REQUEST */
    uint8_t status;            /* CONNECT_RESPONSE */
    uint32_t increment;        /* WINDOW_UPDATE, > 0 */
    const uint8_t *host;       /* CONNECT_REQUEST; NULL when absent (= 127.0.0.1) */
    size_t host_len;           /* 1..255 when host != NULL */
    const uint8_t *data;       /* DATA bytes, HELLO/HELLO_RESPONSE JSON, KEEPALIVE token */
    size_t data_len;           /* KEEPALIVE: 0 or 8 */
};

/* Validates the 6 header bytes. FRAME_OK, or FRAME_E_VERSION/TYPE/LENGTH. */
enum frame_result frame_header_decode(const uint8_t hdr[FRAME_HEADER_LEN],
                                      struct frame_header *out);

/* Decodes a payload of a validated header. FRAME_OK or FRAME_E_PAYLOAD. */
enum frame_result frame_payload_decode(uint8_t type, const uint8_t *payload, size_t len,
                                       struct frame *out);

/* Decodes one frame from the front of buf. On FRAME_OK sets *consumed to the frame's
 * whole size; on FRAME_NEED_MORE nothing is consumed; other results are fatal errors. */
enum frame_result frame_decode(const uint8_t *buf, size_t len, struct frame *out,
                               size_t *consumed);

/* Writes a header into out. */
void frame_encode_header(uint8_t out[FRAME_HEADER_LEN], uint8_t type, uint32_t length);

/* Encoders write a whole frame into out (cap bytes) and return its length, or
 * FRAME_E_BUFFER when it does not fit or an argument is out of range. */
int frame_encode_connect_request(uint8_t *out, size_t cap, uint32_t conn_id, uint16_t port,
                                 const char *host /* NULL = default */);
int frame_encode_connect_response(uint8_t *out, size_t cap, uint32_t conn_id, uint8_t status);
/* Header + conn_id only (10 bytes); the caller appends data_len bytes (<= FRAME_MAX_DATA),
 * so Data bytes can move between buffers without a copy. */
int frame_encode_data_header(uint8_t *out, size_t cap, uint32_t conn_id, size_t data_len);
int frame_encode_data(uint8_t *out, size_t cap, uint32_t conn_id, const uint8_t *data,
                      size_t data_len);
int frame_encode_close(uint8_t *out, size_t cap, uint32_t conn_id);
int frame_encode_keepalive(uint8_t *out, size_t cap, const uint8_t *token /* NULL or 8 B */);
int frame_encode_json(uint8_t *out, size_t cap, uint8_t type /* HELLO or HELLO_RESPONSE */,
                      const char *json, size_t json_len);
int frame_encode_window_update(uint8_t *out, size_t cap, uint32_t conn_id, uint32_t increment);
int frame_encode_shut_write(uint8_t *out, size_t cap, uint32_t conn_id);

/* A stable name for a decoder result, for log lines ("bad version", ...). */
const char *frame_result_name(enum frame_result r);

#endif

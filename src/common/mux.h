/* The tunnel session (SPEC §4): streams keyed by conn_id, per-stream windows with
 * WindowUpdate, half-close (ShutWrite), Close, KeepAlive with RTT. The same code runs on
 * both sides. I/O-free in the nghttp2 sense: mux_session_input() consumes frames from an
 * evbuffer, and every frame the session wants to send is appended to the output evbuffer
 * given at creation, which an adapter drains to the socket.
 *
 * Stream lifetime: the session owns every stream. The application's reference ends when
 * it calls mux_stream_close() or when its on_close callback returns (after that the
 * pointer must not be used). Both sides send Close exactly once; a stream is freed only
 * after Close went both ways (or a failed ConnectResponse), in a pass that runs after the
 * callbacks returned, so a callback never sees its stream freed under it.
 *
 * Error model: fatal only, as in SSH. Every error the peer can cause -- an undecodable
 * frame, a frame that breaks the protocol for one stream (Data, WindowUpdate or
 * ShutWrite for a stream that is not open, a second Close or ShutWrite, an unexpected
 * ConnectResponse, a window grown past its limit) -- makes mux_session_input() return a negative MUX_E_* and the whole tunnel is
 * dropped by its owner (mux_conn.c's on_stop hook), with every stream on it. There is no
 * per-stream reset: a peer that breaks one stream's rules is not trusted with the others.
 * Per-stream outcomes that are not errors travel as frames: a refused ConnectResponse,
 * Close, ShutWrite (a Close for a stream already gone is tolerated: the two Closes
 * crossed). Calls the application makes in the wrong state (writing a closed
 * stream) return MUX_E_STATE and harm nothing.
 *
 * Never free the session from inside one of its callbacks. */
#ifndef PORTMUX_MUX_H
#define PORTMUX_MUX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct evbuffer;
struct mux_session;
struct mux_stream;

/* Initial window of every stream in each direction. */
#define MUX_INITIAL_WINDOW (256u * 1024u)
/* The most a receiver grants one stream (window auto-tuning, see mux.c); the session's
 * buffer limit bounds it first (it stays below MUX_MAX_WINDOW whatever that limit). */
#define MUX_MAX_RECV_LIMIT (UINT32_C(1) << 30)
/* WindowUpdates in a row that found the last window round paced by the window (about one
 * round trip) and the consumer drained, before a stream's window first doubles (after
 * that, each further one doubles it again). */
#define MUX_GROW_STREAK 2u
/* The most credit a receiver holds back before it sends a WindowUpdate (see
 * mux_stream_consumed): small windows go back at a half or a quarter, a grown one every
 * this many bytes (at 8 Gb/s, about 950 WindowUpdates a second, 12 bytes each). */
#define MUX_UPDATE_STEP_MAX (1024u * 1024u)
/* Default for all window growth of one session together (tunnel.session_buffer_limit). */
#define MUX_SESSION_BUFFER_LIMIT ((size_t)64 * 1024 * 1024)
/* A window may never grow beyond this (protocol error). */
#define MUX_MAX_WINDOW (UINT32_C(1) << 31)
/* Streams stop queueing Data while the session output holds this much (bounded memory). */
#define MUX_OUT_SOFT_LIMIT (1024u * 1024u)
#define MUX_KEEPALIVE_TOKEN_LEN 8

enum mux_role { MUX_ROLE_SERVER, MUX_ROLE_CLIENT };

enum mux_result {
    MUX_OK = 0,
    MUX_STOPPED = 1,         /* input: a callback asked to stop reading (not an error) */
    MUX_E_FRAME = -1,        /* undecodable frame (version, type, length, payload) */
    MUX_E_PROTOCOL = -2,     /* a well-formed frame that breaks the protocol */
    MUX_E_STATE = -3,        /* call not valid in the stream's state */
    MUX_E_NOMEM = -4,
};

enum mux_close_reason {
    MUX_CLOSE_PEER,          /* the peer sent Close: deliver what is buffered, then close */
    MUX_CLOSE_SESSION,       /* the session is going away: close at once */
};

/* mux_stream_splice's results. */
enum mux_splice_result {
    MUX_SPLICE_MOVED,        /* one Data frame left (*moved bytes) */
    MUX_SPLICE_EOF,          /* the socket's FIN: nothing more will come */
    MUX_SPLICE_AGAIN,        /* the socket has nothing to read now */
    MUX_SPLICE_BLOCKED,      /* window shut, or the transport still sends this session's
                                last zero-copy frame: on_writable follows */
    MUX_SPLICE_COPY,         /* frames wait in the session output, which a zero-copy
                                frame must not overtake: copy (mux_stream_write) this time */
    MUX_SPLICE_NONE,         /* no zero-copy transport (TLS, or none set): copy instead */
    MUX_SPLICE_ERROR,        /* reading the socket failed (errno) */
    MUX_SPLICE_STATE,        /* the stream cannot send (not open, shut, closed) */
};

/* A transport that can send a Data frame's payload straight from a socket (splice(2)
 * through a pipe: the bytes never enter user space). The session's output evbuffer and
 * these bytes go out on one connection in the order they were produced: the session
 * uses the transport only while its output is empty, and the transport sends its frame
 * ahead of anything appended later. ready() is false while part of its last frame still
 * waits to be sent. */
struct mux_splice_ops {
    bool (*ready)(void *arg);
    /* Takes up to max bytes from fd into the transport's staging pipe. Returns the bytes
     * taken, 0 at EOF, or -1 with errno (EAGAIN: nothing to read). */
    ssize_t (*stage)(void *arg, int fd, size_t max);
    /* Sends hdr (hlen bytes), then the n staged bytes, ahead of anything appended to the
     * output later. Never fails here: a socket error surfaces through the transport's own
     * error path. */
    void (*send)(void *arg, const uint8_t *hdr, size_t hlen, size_t n);
};

/* Per-stream callbacks; any may be NULL. arg is given with mux_stream_set_callbacks. */
struct mux_stream_callbacks {
    /* Server role: the client answered the ConnectRequest. When status is not
     * FRAME_STATUS_OK the stream is finished once this returns. */
    void (*on_connect_response)(struct mux_stream *st, uint8_t status, void *arg);
    /* New Data was appended to the stream's sink. */
    void (*on_data)(struct mux_stream *st, size_t len, void *arg);
    /* The stream may be able to send again (window opened or session output drained). */
    void (*on_writable)(struct mux_stream *st, void *arg);
    /* The peer sent ShutWrite: no more Data will come. */
    void (*on_shut)(struct mux_stream *st, void *arg);
    /* The stream is gone; st is invalid once this returns. */
    void (*on_close)(struct mux_stream *st, enum mux_close_reason why, void *arg);
};

struct mux_session_callbacks {
    /* Client role: the server asks for a stream to host:port (NUL-terminated, default
     * "127.0.0.1"). Set the stream's callbacks here and answer, now or later, with
     * mux_stream_respond(). */
    void (*on_connect_request)(struct mux_session *s, struct mux_stream *st,
                               const char *host, uint16_t port, void *arg);
    /* Hello (server role), HelloResponse or Notice (client role; type says which). json
     * is not NUL-terminated.
     * Return 0 to go on, MUX_STOPPED to stop reading input, or < 0 for a protocol error. */
    int (*on_json)(struct mux_session *s, uint8_t type, const char *json, size_t len,
                   void *arg);
};

/* Creates a session appending its frames to out (not owned). Until mux_session_set_open()
 * only Hello/HelloResponse frames are accepted; anything else is a protocol error. */
struct mux_session *mux_session_new(enum mux_role role, struct evbuffer *out,
                                    const struct mux_session_callbacks *cb, void *arg);
/* Calls on_close(MUX_CLOSE_SESSION) for every stream the application holds, frees all.
 * NULL-safe. */
void mux_session_free(struct mux_session *s);

/* Caps what the windows of all streams together may grow beyond MUX_INITIAL_WINDOW each
 * (default MUX_SESSION_BUFFER_LIMIT; 0 = no growth). */
void mux_session_set_buffer_limit(struct mux_session *s, size_t bytes);
/* Where window auto-tuning and the KeepAlive round trip read the time, in microseconds
 * (tests model a round trip); NULL = CLOCK_MONOTONIC. */
void mux_session_set_clock(struct mux_session *s, uint64_t (*now_us)(void *arg), void *arg);
/* Window growth granted so far to the session's live streams, in bytes. */
size_t mux_session_buffer_grown(const struct mux_session *s);

/* Lets stream and KeepAlive frames through (after a successful Hello). */
void mux_session_set_open(struct mux_session *s);
bool mux_session_is_open(const struct mux_session *s);
/* Optimistic data (docs/PROTOCOL.md): set on both ends once the client's Hello said
 * "optimistic": true. Server role: mux_stream_write() may send a stream's Data right after
 * its ConnectRequest, within the stream's window, before the ConnectResponse (ShutWrite
 * still waits for it). Client role: Data for a stream not yet answered is accepted, within
 * its window, and held in the stream's own buffer until mux_stream_set_sink() (a refusal
 * drops it with the stream); Data for an unknown stream is dropped rather than a protocol
 * error, since it may have crossed our refusal. */
void mux_session_set_early_data(struct mux_session *s);
bool mux_session_early_data(const struct mux_session *s);

/* Gives the session a zero-copy transport (NULL: none). ops must outlive the session. */
void mux_session_set_splice(struct mux_session *s, const struct mux_splice_ops *ops,
                            void *arg);
/* The transport became ready() again: streams mux_stream_splice() found it busy get
 * on_writable, while it stays ready. Call it whenever its last frame is out, whether or
 * not the output is empty (a stream that then finds frames in the output copies). */
void mux_session_splice_ready(struct mux_session *s);

/* Consumes every whole frame at the front of in; a partial frame stays. Returns MUX_OK,
 * MUX_STOPPED, or a negative error (fatal: close the tunnel; see mux_session_error). */
int mux_session_input(struct mux_session *s, struct evbuffer *in);
/* A human reason for the last fatal error ("" when none). */
const char *mux_session_error(const struct mux_session *s);

/* Appends a Hello, HelloResponse or Notice frame. */
int mux_session_send_json(struct mux_session *s, uint8_t type, const char *json, size_t len);
/* Appends a KeepAlive with a fresh token; its echo measures the RTT. */
int mux_session_send_keepalive(struct mux_session *s);
/* How many of our KeepAlive tokens the peer has echoed: a count that moved since a
 * KeepAlive was sent means the peer is alive (the server's takeover probe). */
uint64_t mux_session_keepalive_echoes(const struct mux_session *s);
/* Last measured round-trip time in milliseconds; 0 before the first echo. */
double mux_session_rtt_ms(const struct mux_session *s);
/* The adapter drained the output below the soft limit: streams waiting for room get
 * on_writable, round robin, while there is room. */
void mux_session_output_drained(struct mux_session *s);
/* Streams the application holds (not those only waiting for the peer's Close). */
size_t mux_session_stream_count(const struct mux_session *s);
/* Streams the application closed that wait for the peer's Close: each holds a table entry
 * until it comes, so a peer that never sends one would grow them for ever unless the
 * application counts them in its stream cap. */
size_t mux_session_closing_count(const struct mux_session *s);

/* Server role: opens a stream and sends ConnectRequest(host, port). NULL on failure. */
struct mux_stream *mux_stream_open(struct mux_session *s, const char *host, uint16_t port,
                                   const struct mux_stream_callbacks *cb, void *arg);
/* Client role: answers the ConnectRequest. Any status but FRAME_STATUS_OK ends the
 * stream (the application's reference with it). */
int mux_stream_respond(struct mux_stream *st, uint8_t status);

void mux_stream_set_callbacks(struct mux_stream *st, const struct mux_stream_callbacks *cb,
                              void *arg);
/* Where received Data goes (e.g. a bufferevent's output). Bytes already received move
 * there at once. NULL = the stream's own buffer. */
void mux_stream_set_sink(struct mux_stream *st, struct evbuffer *sink);
struct evbuffer *mux_stream_sink(struct mux_stream *st);
/* Received bytes waiting in the stream's own buffer (no sink set yet), without creating
 * that buffer: what optimistic data a client holds for a stream it is still dialling. */
size_t mux_stream_held(const struct mux_stream *st);

uint32_t mux_stream_id(const struct mux_stream *st);
struct mux_session *mux_stream_session(const struct mux_stream *st);
/* Bytes the stream may send right now: min(window, room in the session output). */
size_t mux_stream_send_room(const struct mux_stream *st);
uint32_t mux_stream_send_window(const struct mux_stream *st);
/* Bytes the peer may still send on the stream before our next WindowUpdate. */
uint32_t mux_stream_recv_window(const struct mux_stream *st);

/* Moves as much of src as the window and the session output allow into Data frames of
 * at most FRAME_MAX_DATA bytes. Returns the bytes moved (0 = blocked: on_writable
 * follows), or MUX_E_STATE when the stream cannot send (not open, shut, closed). */
int mux_stream_write(struct mux_stream *st, struct evbuffer *src);
/* Zero-copy mux_stream_write() from a socket: one Data frame of up to the window
 * (FRAME_MAX_DATA at most) goes from fd to the tunnel through the session's splice
 * transport. *moved is the bytes sent when MUX_SPLICE_MOVED. See enum mux_splice_result;
 * after MUX_SPLICE_NONE use mux_stream_write(). */
enum mux_splice_result mux_stream_splice(struct mux_stream *st, int fd, size_t *moved);
/* Whether the session has a zero-copy transport at all. */
bool mux_stream_can_splice(const struct mux_stream *st);

/* The application drained n received bytes; sends WindowUpdate once half the window is
 * consumed, or a quarter of it when the sink is empty (everything received handed on),
 * never more than MUX_UPDATE_STEP_MAX. */
void mux_stream_consumed(struct mux_stream *st, size_t n);
/* Half-close: sends ShutWrite; no more writes. */
int mux_stream_shut_write(struct mux_stream *st);
/* Sends Close (once) and ends the application's reference. */
void mux_stream_close(struct mux_stream *st);

#endif

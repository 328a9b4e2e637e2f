/* One tunnel connection, on both sides: the bufferevent (plain, or TLS through tls_bev),
 * the mux session speaking over it, the KeepAlive timer, the read pause when the peer
 * stops reading, and JSON control frames. tunnel_server.c and tunnel_client.c both run
 * their sessions through this, so the socket handling of the tunnel exists once; what a
 * side does with Hello, refusals and reconnects stays in its own file (the hooks).
 *
 * On a plaintext connection the session also gets a zero-copy transport
 * (mux_session_set_splice): a bulk stream's Data payload goes socket -> staging pipe ->
 * tunnel socket with splice(2), behind a header sent with send(); while part of such a
 * frame waits for room, the bufferevent's writing is held so nothing overtakes it.
 *
 * Ownership: a mux_conn owns its bufferevent (and with it the SSL and the descriptor) and
 * its mux session; mux_conn_free() frees all three. */
#ifndef PORTMUX_MUX_CONN_H
#define PORTMUX_MUX_CONN_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>
#include <openssl/ssl.h>

#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>

#include "mux.h"

struct mux_conn;

struct mux_conn_hooks {
    /* mux_session_input() returned MUX_STOPPED (an on_json callback asked to stop) or a
     * protocol error (rc < 0). The hook decides: close, hold the input, flush and close.
     * conn may be freed inside. */
    void (*on_stop)(struct mux_conn *conn, int rc, void *arg);
    /* Frames were taken in and the session goes on (after every read). May be NULL. */
    void (*on_input)(struct mux_conn *conn, void *arg);
    /* A bufferevent event (BEV_EVENT_CONNECTED, EOF, ERROR, TIMEOUT). conn may be freed
     * inside. */
    void (*on_event)(struct mux_conn *conn, short what, void *arg);
    /* After mux_conn_close_after_flush(): the output is flushed. Free conn here. */
    void (*on_flushed)(struct mux_conn *conn, void *arg);
};

/* A connection over fd (-1: connect later with mux_conn_connect_hostname), TLS when ssl
 * is not NULL (state says which end of the handshake), running a mux session of role
 * with mcb. bev_options are the bufferevent's (BEV_OPT_CLOSE_ON_FREE is added). Reading
 * and writing are enabled at once. Takes ownership of fd and ssl, also on failure (NULL). */
struct mux_conn *mux_conn_new(struct event_base *base, evutil_socket_t fd, SSL *ssl,
                              enum bufferevent_ssl_state state, int bev_options,
                              enum mux_role role, const struct mux_session_callbacks *mcb,
                              const struct mux_conn_hooks *hooks, void *arg);
/* Frees the mux session first (its streams close through their on_close callbacks), then
 * the timer and the bufferevent. NULL-safe. */
void mux_conn_free(struct mux_conn *conn);

/* Starts the connect of a conn made with fd -1 (IP literal or host name through dns).
 * Errors, even immediate ones, may come back through on_event. Returns 0 or -1. */
int mux_conn_connect_hostname(struct mux_conn *conn, struct evdns_base *dns,
                              const char *host, uint16_t port);

struct mux_session *mux_conn_mux(const struct mux_conn *conn);
/* The bufferevent the frames travel on (the TLS one when TLS is on). */
struct bufferevent *mux_conn_bev(const struct mux_conn *conn);
bool mux_conn_is_tls(const struct mux_conn *conn);

/* The session is open: silence for idle_s either way (nothing received, or our output not
 * moving) is a BEV_EVENT_TIMEOUT, and a KeepAlive goes out every every_s seconds. */
void mux_conn_start_keepalive(struct mux_conn *conn, int every_s, int idle_s);

/* Sends j (stolen; NULL-safe) as one JSON control frame of type (Hello, HelloResponse). */
int mux_conn_send_json(struct mux_conn *conn, uint8_t type, json_t *j);

/* Stops taking input (the rest waits in the kernel and the bufferevent's input). */
void mux_conn_hold_read(struct mux_conn *conn);
/* Takes input again, first what already waits in the bufferevent's input (nothing would
 * wake us for it). conn may be freed inside (through the hooks). */
void mux_conn_resume_read(struct mux_conn *conn);

/* Stops reading and lets the queued frames (a refusal) leave. Returns true when the
 * output is already empty: the caller frees conn now. Otherwise on_flushed follows (or
 * on_event, if the peer goes first); the caller should bound the wait with a timer. */
bool mux_conn_close_after_flush(struct mux_conn *conn);
bool mux_conn_closing(const struct mux_conn *conn);

#endif

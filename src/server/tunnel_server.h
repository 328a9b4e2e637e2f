/* The server's tunnel endpoint: listener (optionally TLS), Hello authentication, one live
 * session per client name, and public connections carried as streams. Owns struct
 * tunnel_server and every session. */
#ifndef PORTMUX_TUNNEL_SERVER_H
#define PORTMUX_TUNNEL_SERVER_H

#include <stdbool.h>
#include <stddef.h>

#include <stdint.h>
#include <time.h>

#include <event2/util.h>

struct server;
struct mapping;
struct tunnel_server;

/* Binds tunnel.listen_addr:listen_port (TLS when configured). NULL + err on failure. */
struct tunnel_server *tunnel_server_new(struct server *srv, char *err, size_t errlen);
/* Closes every session and stream, then the listener. NULL-safe. */
void tunnel_server_free(struct tunnel_server *ts);

/* SIGHUP: reads the TLS files again (same paths); new sessions get the new certificate,
 * live ones keep theirs. 1 when the certificate changed, 0 when not (or no TLS), -1 when
 * the files did not load (logged; the running context stays). */
int tunnel_server_reload_tls(struct tunnel_server *ts);
/* The bound port (useful when listen_port is 0). */
int tunnel_server_port(const struct tunnel_server *ts);

bool tunnel_server_client_connected(const struct tunnel_server *ts, const char *name);
size_t tunnel_server_client_count(const struct tunnel_server *ts);

/* One live client session as the API and /metrics show it. The strings belong to the
 * session: valid until the loop runs again. */
struct tunnel_client_info {
    const char *name;
    const char *remote_addr;
    time_t connected_at;
    size_t streams;               /* bridged to their target */
    double rtt_ms;                /* last KeepAlive round trip */
    uint64_t bytes_in;            /* stream bytes from the client */
    uint64_t bytes_out;           /* stream bytes to the client */
};
typedef void (*tunnel_client_fn)(const struct tunnel_client_info *c, void *arg);

/* Calls fn for every authenticated live session; returns how many. */
size_t tunnel_server_clients_foreach(const struct tunnel_server *ts, tunnel_client_fn fn,
                                     void *arg);
/* Fills *out for client name's live session; false when it has none. ts may be NULL. */
bool tunnel_server_client_info(const struct tunnel_server *ts, const char *name,
                               struct tunnel_client_info *out);
/* The client was removed: its live session (and a Hello waiting on a takeover probe)
 * closes at once. Its mappings stay, waiting for a client of that name. */
void tunnel_server_client_removed(struct tunnel_server *ts, const char *name);

/* A mapping was created, updated or removed: each connected client that asked for
 * notices gets its mappings again when they changed (docs/PROTOCOL.md, Notice). */
void tunnel_server_mappings_changed(struct tunnel_server *ts);

/* Carries an accepted public connection of tunnel mapping m through the tunnel of
 * m->rec.client. Takes ownership of fd. Accounts it with mapping_conn_begin/end on every
 * path: no client, refusal, timeout (tunnel.connect_timeout) close fd and count failed. */
void tunnel_server_forward(struct tunnel_server *ts, struct mapping *m, evutil_socket_t fd);

struct json_t;

/* Where HelloResponse's "nodes" (SPEC §7) come from: fn returns a new JSON array (or
 * NULL) each time a client is accepted. Set by main.c with a cluster; NULL-safe ts. */
void tunnel_server_set_nodes_source(struct tunnel_server *ts,
                                    struct json_t *(*fn)(void *arg), void *arg);

#endif

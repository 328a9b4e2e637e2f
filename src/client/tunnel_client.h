/* The client's side of one tunnel session: connect (TLS optional), Hello, KeepAlive,
 * and ConnectRequests answered by dialling the target (after the --allow check) and
 * bridging it to the stream. Reconnecting is the caller's business (main.c). */
#ifndef PORTMUX_TUNNEL_CLIENT_H
#define PORTMUX_TUNNEL_CLIENT_H

#include <stdbool.h>
#include <stdint.h>

#include <openssl/ssl.h>

struct event_base;
struct evdns_base;
struct allow_list;
struct log_limit;
struct status;
struct status_node;
struct tclient;
struct json_t;

struct tclient_opts {
    const char *host;              /* server host name or IP literal */
    uint16_t port;
    const char *name;              /* client name sent in Hello */
    const char *token;
    SSL_CTX *ssl;                  /* NULL = plaintext; not owned */
    const char *server_name;       /* name the server certificate must carry */
    const struct allow_list *allow;/* not owned */
    /* The cluster nodes the client may connect to (nodes.c); empty: those allow permits
     * (any, when that is empty too). Not owned. */
    const struct allow_list *allow_nodes;
    int heartbeat_interval;        /* seconds between KeepAlives */
    int heartbeat_timeout;         /* seconds of silence before the tunnel is dropped */
    int connect_timeout;           /* seconds for connect + TLS + Hello, and for each dial */
    int max_pending_dials;         /* dials at once; more ConnectRequests get status 1 */
    /* Dials pending across the process, shared by the --server session and every cluster
     * node session, so max_pending_dials bounds them all together (each may hold a
     * window of early data); NULL = this session's own count. Not owned. */
    size_t *dials_total;
    /* Streams at once, dialling or bridged: more ConnectRequests get status 1. Each holds
     * a descriptor and up to a window of bytes for its target, and the server decides how
     * many it opens, so this is the client's own bound on both. 0 = TC_MAX_STREAMS. */
    int max_streams;
    /* Bridged streams across the process (as dials_total); NULL = this session's own. */
    size_t *streams_total;
    /* What all window growth of the session together may reach (the server's
     * tunnel.session_buffer_limit, on this side); 0 = no stream grows past its initial
     * window. main.c's default is MUX_SESSION_BUFFER_LIMIT. */
    size_t session_buffer_limit;
    struct status *status;         /* told of the session and every stream; NULL = none;
                                    * not owned */
    /* An extra cluster node's session (nodes.c): its state goes to this row instead of the
     * Session line, and the mappings it announces are left to the --server session. */
    struct status_node *node;      /* not owned; NULL = the --server session */
    /* The node list of a HelloResponse or of a "nodes" Notice (SPEC §7), when it carries
     * one (an array): a message without a list changes nothing. Borrowed for the call;
     * NULL = ignored. */
    void (*on_nodes)(struct json_t *nodes, void *arg);
    void *nodes_arg;
    /* Shared by the node sessions (nodes.c): how many "cannot connect" / "disconnected"
     * lines they write together, since the server decides how many nodes there are and
     * how often they come and go. NULL = every line (the --server session, whose
     * reconnects back off). Not owned. */
    struct log_limit *end_log;
};

enum tclient_end {
    TCLIENT_LOST,     /* could not connect, or the tunnel dropped: try again */
    TCLIENT_REFUSED,  /* Hello refused or a TLS certificate failure: retrying will not help */
};

/* Called once per tclient_connect() when that attempt ends; the session is already
 * freed. healthy: the session was authenticated and lasted. */
typedef void (*tclient_end_cb)(enum tclient_end how, bool healthy, void *arg);

struct tclient *tclient_new(struct event_base *base, struct evdns_base *dns,
                            const struct tclient_opts *opts, tclient_end_cb cb, void *arg);
/* Starts one attempt. Returns 0 (the end callback follows, later), or -1 when nothing
 * could be started (the callback is not called). */
int tclient_connect(struct tclient *c);
/* Why the last attempt was refused: "server refused: ..." or "TLS handshake failed: ...". */
const char *tclient_refusal(const struct tclient *c);
/* The last attempt ended because the server already has a live session of this client
 * name (a Hello refused with "already_connected" after an earlier success): behind a
 * load balancer, the node it reached is one a cluster node session already serves. */
bool tclient_already_connected(const struct tclient *c);
/* The session is up (HelloResponse ok) and not yet ended. */
bool tclient_up(const struct tclient *c);
/* Closes the session (if any) without calling the end callback. NULL-safe. */
void tclient_free(struct tclient *c);

#endif

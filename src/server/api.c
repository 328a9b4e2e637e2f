/* HTTP API on libmicrohttpd, driven from the server's libevent loop.
 *
 * Why not MHD's own thread: every mapping, listener and counter belongs to the one event
 * loop; a second thread would need a lock around all of them or a request queue. Instead MHD
 * runs in external mode with MHD_USE_EPOLL: its epoll fd is one libevent read event and its
 * timeout one libevent timer, and MHD_run() is called from those callbacks. So every request
 * handler runs on the loop thread and touches the registry directly, without locks. A write
 * (create, update, remove; client create, rotate, remove) is split: the handler checks and
 * starts it, and its reply comes when the store answers (api_pending). With SQLite that is
 * before the handler returns; with PostgreSQL the MHD connection is suspended meanwhile, so
 * a stalled database never holds the loop (SPEC §7).
 *
 * MHD has no listen socket of its own: an evconnlistener accepts and hands each connection
 * over (api_accept_cb says why). What to answer is decided by api_dispatch, which sees no
 * MHD object, so the fuzz target drives exactly the code a real request does. */
#include "api.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/event.h>
#include <event2/listener.h>
#include <jansson.h>
#include <microhttpd.h>

#include "accept_guard.h"
#include "api_guard.h"
#include "api_json.h"
#include "clients.h"
#include "cluster_sync.h"
#include "config.h"
#include "log.h"
#include "log_limit.h"
#include "loop_guard.h"
#include "mapping.h"
#include "mapping_request.h"
#include "metrics.h"
#include "netaddr.h"
#include "proxy_wait.h"
#include "secret.h"
#include "server.h"
#include "tunnel_server.h"
#include "utf8.h"
#include "web.h"

#define API_MAX_BODY (64 * 1024)
#define API_STATUS_SLOTS 600
#define API_BACKLOG 128
/* libmicrohttpd's own messages: at most one line per kind per window, then a count. */
#define API_MHD_LOG_WINDOW 10
#define API_MHD_LOG_KINDS 16

/* One kind of MHD message (its format string) and how often it was held back. */
struct api_mhd_log {
    const char *fmt;
    time_t window_start;
    unsigned long suppressed;
    char last[160];                /* the last line held back, for the summary */
};

struct api {
    struct server *srv;
    struct MHD_Daemon *mhd;
    struct evconnlistener *listener;   /* ours, not MHD's: see api_start_listener */
    struct accept_guard *accept_guard;
    struct proxy_waits *proxy_waits; /* from trusted_proxies, before their header */
    bool via_balancer;             /* the connection being added came through one */
    struct event *ev_io;
    struct event *ev_timer;
    int port;
    unsigned open_connections;     /* counted by api_notify_connection */
    struct log_limit refused_log;  /* "connection refused" lines: one per 10 s */
    struct log_limit write_refused_log; /* "create/update port N refused" lines: the same */
    TAILQ_HEAD(, api_conn) conns;  /* every open connection, for the slow-request sweep */
    TAILQ_HEAD(, api_request) suspended; /* waiting for a store write (api_pending) */
    struct event *ev_sweep;
    uint64_t status_count[API_STATUS_SLOTS];
    struct api_mhd_log mhd_log[API_MHD_LOG_KINDS];
};

/* Per connection. MHD's connection timeout only counts idle time, so a client that
 * trickles one byte every second would hold its slot for ever; the sweep closes any
 * connection that has not finished a request within api.connection_timeout. */
struct api_conn {
    TAILQ_ENTRY(api_conn) link;
    struct MHD_Connection *conn;
    struct timespec progress;      /* connected, or last request completed */
    struct sockaddr_storage peer;  /* for the per-source share (api_accept_policy) */
};

/* Per request, kept by MHD between calls of the access handler. */
struct api_request {
    char *body;
    size_t len;
    bool too_large;
    /* While its answer is pending (a store write in flight) the connection is suspended
     * and the request is on api->suspended. */
    struct api_pending *pending;
    struct api *api;
    struct MHD_Connection *conn;
    bool suspended;                /* on api->suspended */
    bool waited;                   /* was suspended: the next call sends what pending holds */
    TAILQ_ENTRY(api_request) link;
};

enum api_method { M_GET = 1, M_POST = 2 };

typedef void (*api_handler)(struct server *srv, const struct api_req *rq,
                            struct api_reply *out);

struct api_route {
    const char *path;      /* exact path, or a prefix when it ends with '/' */
    unsigned methods;
    bool needs_token;
    api_handler handler;
};

void api_reply_clear(struct api_reply *r)
{
    free(r->body);
    memset(r, 0, sizeof(*r));
}

/* Answers json (stolen) with the given status. */
static void api_reply_json(struct api_reply *out, unsigned status, json_t *json,
                           const char *allow)
{
    /* 15 significant digits print a rounded rtt_ms as 0.192, not 0.19200000000000001. */
    char *text = json ? json_dumps(json, JSON_COMPACT | JSON_REAL_PRECISION(15)) : NULL;
    json_decref(json);
    api_reply_clear(out);
    /* A final newline, so the shell prompt does not land on curl's output. */
    char *nl = text ? realloc(text, strlen(text) + 2) : NULL;
    if (!nl) {
        free(text);
        out->close = true;
        return;
    }
    size_t len = strlen(nl);
    nl[len] = '\n';
    nl[len + 1] = '\0';
    out->status = status;
    out->type = "application/json";
    out->body = nl;
    out->len = len + 1;
    out->allow = allow;
}

/* msg may quote a peer's bytes (a key, a parse error's text, cut by a bound), and jansson
 * packs nothing that is not UTF-8: cleaned first, so every error gets its answer. */
static void api_fail(struct api_reply *out, enum api_error e, const char *msg,
                     const char *allow)
{
    char text[512];
    utf8_clean_copy(text, sizeof(text), msg);
    json_t *j = json_pack("{s:b, s:s, s:s}", "success", 0, "message", text, "error",
                          api_error_code(e));
    api_reply_json(out, api_error_status(e), j, allow);
}

static void api_ok(struct api_reply *out, unsigned status, const char *msg, json_t *data)
{
    json_t *j = json_pack("{s:b, s:s, s:o}", "success", 1, "message", msg, "data", data);
    api_reply_json(out, status, j, NULL);
}

/* ---- answers that come later (SPEC §7) ----
 * A handler that starts a store write takes an api_pending and hands it to the write as
 * its callback's argument; the callback fills p->reply and calls api_pending_done. Who
 * frees p: api_dispatch, when the write finished before the handler returned; else the
 * glue once it has sent the reply; else (the glue gave up the request: shutdown, the
 * connection closed) api_pending_done itself. So the write always finds p valid. */
struct api_pending {
    struct server *srv;
    struct api_reply reply;
    bool done;                     /* reply is final */
    bool orphan;                   /* nobody will send it: free it when done */
    void (*ready)(struct api_pending *p, void *ctx); /* set by the glue */
    void *ctx;
    int port;                      /* the request's port or client name, for the answer */
    char name[CLIENTS_NAME_MAX + 1];
};

/* Marks out as answered later. NULL when out of memory: out then holds that error and the
 * handler starts nothing. */
static struct api_pending *api_pending_new(struct server *srv, struct api_reply *out)
{
    struct api_pending *p = calloc(1, sizeof(*p));
    if (!p) {
        api_fail(out, API_E_INTERNAL, "out of memory", NULL);
        return NULL;
    }
    p->srv = srv;
    out->pending = p;
    return p;
}

static void api_pending_free(struct api_pending *p)
{
    api_reply_clear(&p->reply);
    free(p);
}

static void api_pending_done(struct api_pending *p)
{
    p->done = true;
    if (p->orphan)
        api_pending_free(p);
    else if (p->ready)
        p->ready(p, p->ctx);
    /* else: still inside api_dispatch, which takes the reply when the handler returns. */
}

/* Moves the final reply of p into out and frees p. */
static void api_pending_take(struct api_pending *p, struct api_reply *out)
{
    *out = p->reply;
    out->pending = NULL;
    memset(&p->reply, 0, sizeof(p->reply));
    api_pending_free(p);
}

static void handle_health(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    size_t clients = srv->tunnel ? tunnel_server_client_count(srv->tunnel) : 0;
    json_t *j = json_pack("{s:s, s:b, s:b, s:I, s:I, s:s, s:I}", "status", "ok",
                          "tunnel_enabled", srv->cfg->tunnel_enabled, "tunnel_connected",
                          clients > 0, "clients", (json_int_t)clients, "mappings",
                          (json_int_t)mapping_registry_count(srv->mappings), "version",
                          PORTMUX_VERSION, "uptime_s",
                          (json_int_t)(time(NULL) - srv->started_at));
    /* What the console shows next to its port field (SPEC §3 /health). */
    json_object_set_new(j, "port_range", json_pack("{s:i, s:i}", "from", srv->cfg->port_from,
                                                   "end", srv->cfg->port_end));
    api_reply_json(out, MHD_HTTP_OK, j, NULL);
}

/* SPEC §2: a tunnel mapping names a known client (§4a). On update only a change of
 * client (or to tunnel mode) is judged, so a mapping whose client was removed can still
 * be disabled or renamed. */
static int api_client_known(struct server *srv, const struct mapping_record *rec,
                            const struct mapping_record *old, char *msg, size_t msglen)
{
    if (!rec->use_tunnel || (old && old->use_tunnel && strcmp(old->client, rec->client) == 0))
        return 0;
    if (srv->clients && clients_find(srv->clients, rec->client))
        return 0;
    snprintf(msg, msglen, "client \"%.64s\" does not exist (GET /api/clients lists them)",
             rec->client);
    return -1;
}

/* A refused create or update, at most one line per 10 s: a client decides how often
 * (a loop on a taken port). Without the API's state (the fuzz target) every line goes. */
static void api_log_write_refused(struct server *srv, const char *what, int port,
                                  const char *err)
{
    unsigned long held = 0;
    if (srv->api && !log_limit_take(&srv->api->write_refused_log, time(NULL), 10, &held))
        return;
    if (held)
        log_warn("api", "%s port %d refused: %s (%lu more creates or updates refused in the "
                        "last 10 s)", what, port, err, held);
    else
        log_warn("api", "%s port %d refused: %s", what, port, err);
}

static void api_created(enum mapping_result r, struct mapping *m, const char *err, void *arg)
{
    struct api_pending *p = arg;
    if (r != MAPPING_OK) {
        api_log_write_refused(p->srv, "create", p->port, err);
        api_fail(&p->reply,
                 r == MAPPING_E_IN_USE        ? API_E_PORT_IN_USE
                 : r == MAPPING_E_EXHAUSTED   ? API_E_RANGE_EXHAUSTED
                 : r == MAPPING_E_UNAVAILABLE ? API_E_STORE_UNAVAILABLE
                                              : API_E_INTERNAL,
                 err, NULL);
    } else {
        log_info("api", "mapping created: port %d -> %s%s:%d", m->rec.port,
                 m->rec.use_tunnel ? "tunnel " : "", mapping_target_host(m),
                 m->rec.target_port);
        tunnel_server_mappings_changed(p->srv->tunnel);
        api_ok(&p->reply, MHD_HTTP_CREATED, "mapping created", api_json_mapping(m));
    }
    api_pending_done(p);
}

static void handle_create(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    struct mapping_record rec;
    char msg[256];
    enum api_error e = mapping_request_parse_create(srv->cfg, rq->body ? rq->body : "",
                                                    rq->len, &rec, msg, sizeof(msg));
    if (e != API_OK) {
        api_fail(out, e, msg, NULL);
        return;
    }
    if (api_client_known(srv, &rec, NULL, msg, sizeof(msg)) != 0 ||
        loop_guard_check_create(srv, &rec, msg, sizeof(msg)) != 0) {
        api_fail(out, API_E_INVALID_FIELD, msg, NULL);
        return;
    }
    struct api_pending *p = api_pending_new(srv, out);
    if (!p)
        return;
    p->port = rec.port;
    mapping_registry_create_async(srv->mappings, &rec, api_created, p);
}

static void api_updated(enum mapping_result r, struct mapping *m, const char *err, void *arg)
{
    struct api_pending *p = arg;
    if (r != MAPPING_OK) {
        api_log_write_refused(p->srv, "update", p->port, err);
        api_fail(&p->reply,
                 r == MAPPING_E_IN_USE        ? API_E_PORT_IN_USE
                 : r == MAPPING_E_UNAVAILABLE ? API_E_STORE_UNAVAILABLE
                 : r == MAPPING_E_BUSY        ? API_E_STORE_UNAVAILABLE
                 : r == MAPPING_E_NOT_FOUND   ? API_E_NOT_FOUND
                                              : API_E_INTERNAL,
                 err, NULL);
    } else {
        log_info("api", "mapping updated: port %d%s", p->port,
                 m->rec.enabled ? "" : " (disabled)");
        tunnel_server_mappings_changed(p->srv->tunnel);
        api_ok(&p->reply, MHD_HTTP_OK, "mapping updated", api_json_mapping(m));
    }
    api_pending_done(p);
}

/* Two passes over the body: the first finds the port (404 before any field is judged
 * against a mapping that does not exist), the second applies the fields onto a copy of
 * the stored record, which the registry then stores and applies. */
static void handle_update(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    const char *body = rq->body ? rq->body : "";
    char msg[256];
    int port = 0;
    enum api_error e = mapping_request_parse_update(srv->cfg, body, rq->len, &port, NULL, NULL,
                                                    msg, sizeof(msg));
    if (e != API_OK) {
        api_fail(out, e, msg, NULL);
        return;
    }
    struct mapping *m = mapping_registry_find(srv->mappings, port);
    if (!m) {
        snprintf(msg, sizeof(msg), "no mapping on port %d", port);
        api_fail(out, API_E_NOT_FOUND, msg, NULL);
        return;
    }
    struct mapping_record *rec = malloc(sizeof(*rec));
    if (!rec) {
        api_fail(out, API_E_INTERNAL, "out of memory", NULL);
        return;
    }
    *rec = m->rec;
    unsigned named = 0;
    e = mapping_request_parse_update(srv->cfg, body, rq->len, &port, rec, &named, msg,
                                     sizeof(msg));
    if (e == API_OK && (api_client_known(srv, rec, &m->rec, msg, sizeof(msg)) != 0 ||
                        loop_guard_check_create(srv, rec, msg, sizeof(msg)) != 0))
        e = API_E_INVALID_FIELD;
    struct api_pending *p;
    if (e != API_OK) {
        api_fail(out, e, msg, NULL);
    } else if ((p = api_pending_new(srv, out)) != NULL) {
        p->port = port;
        mapping_registry_update_async(srv->mappings, rec, named, api_updated, p);
    }
    free(rec);
}

static void api_removed(enum mapping_result r, struct mapping *m, const char *err, void *arg)
{
    struct api_pending *p = arg;
    char msg[64];
    if (r == MAPPING_E_NOT_FOUND) {
        snprintf(msg, sizeof(msg), "no mapping on port %d", p->port);
        api_fail(&p->reply, API_E_NOT_FOUND, msg, NULL);
    } else if (r == MAPPING_E_UNAVAILABLE || r == MAPPING_E_BUSY) {
        api_fail(&p->reply, API_E_STORE_UNAVAILABLE, err, NULL);
    } else if (r != MAPPING_OK) {
        api_fail(&p->reply, API_E_INTERNAL, "database error", NULL);
    } else {
        log_info("api", "mapping removed: port %d", p->port);
        tunnel_server_mappings_changed(p->srv->tunnel);
        api_ok(&p->reply, MHD_HTTP_OK, "mapping removed", json_pack("{s:i}", "port", p->port));
    }
    api_pending_done(p);
}

static void handle_remove(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    int port = 0;
    char msg[256];
    enum api_error e = mapping_request_parse_remove(rq->body ? rq->body : "", rq->len, &port,
                                                    msg, sizeof(msg));
    if (e != API_OK) {
        api_fail(out, e, msg, NULL);
        return;
    }
    struct api_pending *p = api_pending_new(srv, out);
    if (!p)
        return;
    p->port = port;
    mapping_registry_remove_async(srv->mappings, port, api_removed, p);
}

/* SPEC §7. With SQLite there is no cluster: 404, like any path the server lacks. */
static void handle_cluster(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    if (!srv->cluster_sync) {
        api_fail(out, API_E_NOT_FOUND, "no cluster: database.url is not set", NULL);
        return;
    }
    api_ok(out, MHD_HTTP_OK, "ok", cluster_sync_nodes_json(srv->cluster_sync));
}

static void handle_list(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    json_t *arr = json_array();
    for (struct mapping *m = mapping_registry_first(srv->mappings); m;
         m = mapping_registry_next(m)) {
        json_t *o = api_json_mapping(m);
        if (o)
            cluster_sync_mapping_nodes(srv->cluster_sync, m, o); /* §7, PostgreSQL only */
        json_array_append_new(arr, o);
    }
    json_t *data = json_pack("{s:o, s:I}", "mappings", arr, "count",
                             (json_int_t)mapping_registry_count(srv->mappings));
    api_ok(out, MHD_HTTP_OK, "ok", data);
}

/* ---- tunnel clients (SPEC §4a) ---- */

static void api_time_json(json_t *obj, const char *key, int64_t t)
{
    char when[32];
    struct tm tm;
    time_t tt = (time_t)t;
    if (t <= 0 || !gmtime_r(&tt, &tm)) {
        json_object_set_new(obj, key, json_null());
        return;
    }
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    json_object_set_new(obj, key, json_string(when));
}

/* One client as GET /api/clients shows it: live fields from its session, null or 0
 * when it has none. */
static json_t *api_client_json(struct server *srv, const struct clients_entry *e)
{
    struct tunnel_client_info info;
    json_t *live = tunnel_server_client_info(srv->tunnel, e->name, &info)
                       ? api_json_tunnel_client(&info)
                       : NULL;
    json_t *c = json_pack("{s:s, s:s, s:b, s:I, s:I}", "name", e->name, "source",
                          e->source == CLIENTS_SOURCE_CONFIG ? "config" : "api", "connected",
                          live != NULL, "takeovers", (json_int_t)e->takeovers, "refused",
                          (json_int_t)e->refused);
    if (!c) {
        json_decref(live);
        return NULL;
    }
    api_time_json(c, "created_at", e->created_at);
    api_time_json(c, "last_seen", live ? (int64_t)time(NULL) : e->last_seen);
    if (live) {
        static const char *const keys[] = {"remote_addr", "connected_at", "streams",
                                           "rtt_ms", "bytes_in", "bytes_out"};
        for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
            json_object_set(c, keys[i], json_object_get(live, keys[i]));
        json_decref(live);
    } else {
        json_object_set_new(c, "remote_addr", json_null());
        json_object_set_new(c, "connected_at", json_null());
        json_object_set_new(c, "streams", json_integer(0));
        json_object_set_new(c, "rtt_ms", json_null());
        json_object_set_new(c, "bytes_in", json_integer(0));
        json_object_set_new(c, "bytes_out", json_integer(0));
    }
    return c;
}

static void handle_clients(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    json_t *arr = json_array();
    size_t n = clients_count(srv->clients);
    for (size_t i = 0; i < n; i++)
        json_array_append_new(arr, api_client_json(srv, clients_at(srv->clients, i)));
    json_t *data = json_pack("{s:o, s:I}", "clients", arr, "count", (json_int_t)n);
    api_ok(out, MHD_HTTP_OK, "ok", data);
}

/* Parses {"name": s} plus the optional integer grace_s (rotate only; grace may be NULL).
 * The name is copied to name; *grace stays as given when absent. */
static enum api_error api_client_body(const struct api_req *rq, char *name, size_t namelen,
                                      int64_t *grace, char *msg, size_t msglen)
{
    enum api_error e = API_OK;
    json_t *obj = mapping_request_load_object(rq->body ? rq->body : "", rq->len, &e, msg,
                                              msglen);
    if (!obj)
        return e;
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        if (strcmp(key, "name") != 0 && !(grace && strcmp(key, "grace_s") == 0)) {
            snprintf(msg, msglen, "unknown field \"%.64s\"", key);
            e = API_E_INVALID_FIELD;
            goto out;
        }
    }
    v = json_object_get(obj, "name");
    const char *s = json_string_value(v);
    if (!s || strlen(s) != json_string_length(v) || !clients_name_valid(s)) {
        snprintf(msg, msglen, "name must be 1-64 characters of A-Z a-z 0-9 . _ -");
        e = API_E_INVALID_FIELD;
        goto out;
    }
    snprintf(name, namelen, "%s", s);
    v = grace ? json_object_get(obj, "grace_s") : NULL;
    if (v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > CLIENTS_MAX_GRACE_S) {
            snprintf(msg, msglen, "grace_s must be an integer from 0 to %d",
                     CLIENTS_MAX_GRACE_S);
            e = API_E_INVALID_FIELD;
            goto out;
        }
        *grace = json_integer_value(v);
    }
out:
    json_decref(obj);
    return e;
}

static void api_client_fail(struct api_reply *out, enum clients_result r, const char *name)
{
    char msg[256];
    switch (r) {
    case CLIENTS_EXISTS:
        snprintf(msg, sizeof(msg), "client \"%s\" exists", name);
        api_fail(out, API_E_CLIENT_EXISTS, msg, NULL);
        return;
    case CLIENTS_NOT_FOUND:
        snprintf(msg, sizeof(msg), "no client \"%s\"", name);
        api_fail(out, API_E_NOT_FOUND, msg, NULL);
        return;
    case CLIENTS_CONFIG:
        snprintf(msg, sizeof(msg), "client \"%s\" is managed by the config file", name);
        api_fail(out, API_E_MANAGED_BY_CONFIG, msg, NULL);
        return;
    case CLIENTS_INVALID:
        api_fail(out, API_E_INVALID_FIELD, "invalid name or grace_s", NULL);
        return;
    case CLIENTS_UNAVAILABLE:
        api_fail(out, API_E_STORE_UNAVAILABLE, "the database cannot take the write now (the server log says why); nothing changed", NULL);
        return;
    case CLIENTS_CONFLICT:
        snprintf(msg, sizeof(msg), "client \"%s\" was removed and created anew by another "
                 "node meanwhile; nothing changed, try again", name);
        api_fail(out, API_E_STORE_UNAVAILABLE, msg, NULL);
        return;
    case CLIENTS_UNCONFIRMED:
        snprintf(msg, sizeof(msg), "the database did not confirm the write of client \"%s\" "
                 "in time: it may be stored (GET /api/clients shows the outcome once this "
                 "node has read it back)", name);
        api_fail(out, API_E_STORE_UNAVAILABLE, msg, NULL);
        return;
    case CLIENTS_BUSY:
        snprintf(msg, sizeof(msg), "a change of client \"%s\" is being stored; try again",
                 name);
        api_fail(out, API_E_STORE_UNAVAILABLE, msg, NULL);
        return;
    default:
        api_fail(out, API_E_INTERNAL, "database error", NULL);
        return;
    }
}

static void api_client_created(enum clients_result r, const char *token, int64_t until,
                               void *arg)
{
    struct api_pending *p = arg;
    if (r != CLIENTS_OK)
        api_client_fail(&p->reply, r, p->name);
    else
        api_ok(&p->reply, MHD_HTTP_CREATED, "client created; the token is shown only now",
               json_pack("{s:s, s:s}", "name", p->name, "token", token));
    api_pending_done(p);
}

/* A client request's body, judged; then its answer marked as coming later, with the
 * name it is about. NULL when out already holds the error. grace: see api_client_body. */
static struct api_pending *api_client_start(struct server *srv, const struct api_req *rq,
                                            struct api_reply *out, int64_t *grace)
{
    char name[CLIENTS_NAME_MAX + 1], msg[160];
    enum api_error e = api_client_body(rq, name, sizeof(name), grace, msg, sizeof(msg));
    if (e != API_OK) {
        api_fail(out, e, msg, NULL);
        return NULL;
    }
    struct api_pending *p = api_pending_new(srv, out);
    if (p)
        snprintf(p->name, sizeof(p->name), "%s", name);
    return p;
}

static void handle_client_create(struct server *srv, const struct api_req *rq,
                                 struct api_reply *out)
{
    struct api_pending *p = api_client_start(srv, rq, out, NULL);
    if (p)
        clients_create_async(srv->clients, p->name, api_client_created, p);
}

static void api_client_rotated(enum clients_result r, const char *token, int64_t until,
                               void *arg)
{
    struct api_pending *p = arg;
    if (r != CLIENTS_OK) {
        api_client_fail(&p->reply, r, p->name);
    } else {
        json_t *data = json_pack("{s:s, s:s}", "name", p->name, "token", token);
        api_time_json(data, "old_token_valid_until", until);
        api_ok(&p->reply, MHD_HTTP_OK, "token rotated; the new token is shown only now", data);
    }
    api_pending_done(p);
}

static void handle_client_rotate(struct server *srv, const struct api_req *rq,
                                 struct api_reply *out)
{
    int64_t grace = CLIENTS_DEFAULT_GRACE_S;
    struct api_pending *p = api_client_start(srv, rq, out, &grace);
    if (p)
        clients_rotate_async(srv->clients, p->name, grace, api_client_rotated, p);
}

static void api_client_removed(enum clients_result r, const char *token, int64_t until,
                               void *arg)
{
    struct api_pending *p = arg;
    if (r != CLIENTS_OK) {
        api_client_fail(&p->reply, r, p->name);
    } else {
        tunnel_server_client_removed(p->srv->tunnel, p->name);
        api_ok(&p->reply, MHD_HTTP_OK, "client removed", json_pack("{s:s}", "name", p->name));
    }
    api_pending_done(p);
}

static void handle_client_remove(struct server *srv, const struct api_req *rq,
                                 struct api_reply *out)
{
    struct api_pending *p = api_client_start(srv, rq, out, NULL);
    if (p)
        clients_remove_async(srv->clients, p->name, api_client_removed, p);
}

static void handle_metrics(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    size_t len = 0;
    /* The API's own counters go to metrics as plain numbers: metrics.c includes no api.h. */
    char *text = srv->api ? metrics_render(srv, srv->api->status_count, API_STATUS_SLOTS, &len)
                          : metrics_render(srv, NULL, 0, &len);
    if (!text) {
        api_fail(out, API_E_INTERNAL, "out of memory", NULL);
        return;
    }
    api_reply_clear(out);
    out->status = MHD_HTTP_OK;
    out->type = "text/plain; version=0.0.4; charset=utf-8";
    out->body = text;
    out->len = len;
}

static void handle_console(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    const struct web_asset *a = web_find(rq->url);
    if (!a) {
        api_fail(out, API_E_NOT_FOUND, "no such page", NULL);
        return;
    }
    api_reply_clear(out);
    out->status = MHD_HTTP_OK;
    out->asset = a;
}

static const struct api_route api_routes[] = {
    {"/health", M_GET, false, handle_health},
    {"/api/mapping/create", M_POST, true, handle_create},
    {"/api/mapping/update", M_POST, true, handle_update},
    {"/api/mapping/remove", M_POST, true, handle_remove},
    {"/api/mapping/update", M_POST, true, handle_update},
    {"/api/mapping/list", M_GET, true, handle_list},
    {"/api/clients", M_GET, true, handle_clients},
    {"/api/cluster", M_GET, true, handle_cluster},
    {"/api/client/create", M_POST, true, handle_client_create},
    {"/api/client/rotate", M_POST, true, handle_client_rotate},
    {"/api/client/remove", M_POST, true, handle_client_remove},
    {"/metrics", M_GET, true, handle_metrics},
    {"/", M_GET, false, handle_console},
    {"/ui/", M_GET, false, handle_console},
};

static const struct api_route *api_route_find(const char *url)
{
    for (size_t i = 0; i < sizeof(api_routes) / sizeof(api_routes[0]); i++) {
        const char *p = api_routes[i].path;
        size_t n = strlen(p);
        bool prefix = n > 1 && p[n - 1] == '/';
        if (prefix ? strncmp(url, p, n) == 0 : strcmp(url, p) == 0)
            return &api_routes[i];
    }
    return NULL;
}

static bool api_peer_allowed(const struct config *cfg, const struct sockaddr *peer)
{
    if (cfg->allowed_ips_len == 0)
        return true;
    if (!peer)
        return false;
    for (size_t i = 0; i < cfg->allowed_ips_len; i++)
        if (netaddr_cidr_match(&cfg->allowed_ips[i], peer))
            return true;
    return false;
}

static const char *api_header(const struct api_req *rq, const char *name)
{
    return rq->header ? rq->header(rq->header_ctx, name) : NULL;
}

static bool api_token_ok(const struct config *cfg, const struct api_req *rq)
{
    const char *token = cfg->api_token;
    if (!token || !*token)
        return true;
    const char *h = api_header(rq, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return false;
    return secret_equal(token, h + 7, strlen(h + 7));
}

static const char *api_allow_header(unsigned methods)
{
    return methods == M_GET ? "GET, HEAD" : methods == M_POST ? "POST" : "GET, HEAD, POST";
}

/* The network filter comes first so a refused peer learns nothing else; then who the
 * request is for (Host) and who sent it (Origin), before the path or the token can tell
 * a browser-borne attacker anything. */
bool api_admit(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    const struct config *cfg = srv->cfg;
    if (!api_peer_allowed(cfg, rq->peer)) {
        /* Its connection is one of the few outsiders share (api_accept_policy): free it. */
        api_fail(out, API_E_FORBIDDEN, "address not allowed", NULL);
        out->last = true;
        return false;
    }
    const char *host = api_header(rq, "Host");
    if (!api_guard_host_ok(cfg, host)) {
        api_fail(out, API_E_BAD_HOST,
                 "unknown Host: the API answers to loopback addresses, localhost, "
                 "api.listen_addr and api.allowed_hosts",
                 NULL);
        return false;
    }
    if (!api_guard_origin_ok(cfg, api_header(rq, "Origin"), host,
                             api_header(rq, "Sec-Fetch-Site"))) {
        api_fail(out, API_E_CROSS_ORIGIN, "cross-origin requests are refused", NULL);
        return false;
    }
    const struct api_route *route = api_route_find(rq->url);
    if (!route) {
        api_fail(out, API_E_NOT_FOUND, "no such endpoint", NULL);
        return false;
    }
    /* HEAD goes wherever GET does; MHD leaves the body out. */
    unsigned m = strcmp(rq->method, "GET") == 0 || strcmp(rq->method, "HEAD") == 0 ? M_GET
                 : strcmp(rq->method, "POST") == 0                                   ? M_POST
                                                                                     : 0;
    if (!(m & route->methods)) {
        api_fail(out, API_E_METHOD_NOT_ALLOWED, "method not allowed",
                 api_allow_header(route->methods));
        return false;
    }
    if (route->needs_token && !api_token_ok(cfg, rq)) {
        api_fail(out, API_E_UNAUTHORIZED, "missing or wrong bearer token", NULL);
        return false;
    }
    const char *cl = api_header(rq, "Content-Length");
    if (cl && strtoull(cl, NULL, 10) > API_MAX_BODY) {
        api_fail(out, API_E_BODY_TOO_LARGE, "body over 64 KiB", NULL);
        return false;
    }
    return true;
}

void api_dispatch(struct server *srv, const struct api_req *rq, struct api_reply *out)
{
    if (!api_admit(srv, rq, out))
        return;
    if (rq->too_large) {
        api_fail(out, API_E_BODY_TOO_LARGE, "body over 64 KiB", NULL);
        return;
    }
    api_route_find(rq->url)->handler(srv, rq, out);
    /* The write finished inside the handler (always with SQLite): a plain reply. */
    if (out->pending && out->pending->done)
        api_pending_take(out->pending, out);
}

/* ---- MHD glue ---- */

/* Queues the reply on the connection and frees what it owned. */
static enum MHD_Result api_send(struct api *api, struct MHD_Connection *conn,
                                struct api_reply *r)
{
    struct MHD_Response *resp = NULL;
    if (r->close) {
        api_reply_clear(r);
        return MHD_NO;
    }
    if (r->asset) {
        resp = MHD_create_response_from_buffer(r->asset->len, (void *)r->asset->data,
                                               MHD_RESPMEM_PERSISTENT);
        if (resp)
            web_add_headers(resp, r->asset);
    } else {
        resp = MHD_create_response_from_buffer(r->len, r->body, MHD_RESPMEM_MUST_FREE);
        if (resp) {
            r->body = NULL; /* MHD frees it now */
            MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, r->type);
            MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
            if (r->allow)
                MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, r->allow);
        }
    }
    if (resp && r->last)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    unsigned status = r->status;
    api_reply_clear(r);
    if (!resp)
        return MHD_NO;
    enum MHD_Result ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    if (status < API_STATUS_SLOTS)
        api->status_count[status]++;
    return ret;
}

static const char *api_mhd_header(void *ctx, const char *name)
{
    return MHD_lookup_connection_value(ctx, MHD_HEADER_KIND, name);
}

static void api_req_from_mhd(struct api_req *rq, struct MHD_Connection *conn, const char *url,
                             const char *method, const struct api_request *req)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    *rq = (struct api_req){
        .method = method,
        .url = url,
        .peer = ci ? ci->client_addr : NULL,
        .header = api_mhd_header,
        .header_ctx = conn,
        .body = req ? req->body : NULL,
        .len = req ? req->len : 0,
        .too_large = req ? req->too_large : false,
    };
}

/* The write behind a suspended request finished: let MHD call api_access again soon. */
static void api_resume(struct api_pending *p, void *ctx)
{
    struct api_request *req = ctx;
    struct api *api = req->api;
    TAILQ_REMOVE(&api->suspended, req, link);
    req->suspended = false;
    MHD_resume_connection(req->conn);
    event_active(api->ev_timer, EV_TIMEOUT, 1);
}

/* Shutdown: every request still waiting answers 503 at once, and its write, when it ever
 * finishes, frees its own pending (orphan). */
static void api_resume_all(struct api *api)
{
    struct api_request *req;
    while ((req = TAILQ_FIRST(&api->suspended)) != NULL) {
        struct api_pending *p = req->pending;
        struct api_pending *now = calloc(1, sizeof(*now));
        if (now) {
            api_fail(&now->reply, API_E_STORE_UNAVAILABLE, "the server is stopping", NULL);
            now->done = true;
        }
        p->orphan = true;
        p->ready = NULL;
        req->pending = now; /* NULL when out of memory: the connection just closes */
        TAILQ_REMOVE(&api->suspended, req, link);
        req->suspended = false;
        MHD_resume_connection(req->conn);
    }
}

static enum MHD_Result api_access(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
    struct api *api = cls;
    struct api_request *req = *con_cls;
    struct api_req rq;
    struct api_reply out = {0};
    if (req && req->waited) {
        /* Resumed (api_resume): the write is done and its reply is in; none when out of
         * memory at shutdown (api_resume_all), and then the connection just closes. */
        if (!req->pending)
            return MHD_NO;
        api_pending_take(req->pending, &out);
        req->pending = NULL;
        return api_send(api, conn, &out);
    }
    if (!req) {
        /* First call, headers only: refusals never read the body. */
        api_req_from_mhd(&rq, conn, url, method, NULL);
        if (!api_admit(api->srv, &rq, &out))
            return api_send(api, conn, &out);
        req = calloc(1, sizeof(*req));
        if (!req)
            return MHD_NO;
        *con_cls = req;
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (!req->too_large && req->len + *upload_data_size <= API_MAX_BODY) {
            char *nb = realloc(req->body, req->len + *upload_data_size + 1);
            if (!nb)
                return MHD_NO;
            memcpy(nb + req->len, upload_data, *upload_data_size);
            req->body = nb;
            req->len += *upload_data_size;
            req->body[req->len] = '\0';
        } else {
            req->too_large = true;
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    api_req_from_mhd(&rq, conn, url, method, req);
    api_dispatch(api->srv, &rq, &out);
    if (out.pending) {
        /* The answer comes when the write does: hold the connection until then. */
        struct api_pending *p = out.pending;
        req->pending = p;
        req->api = api;
        req->conn = conn;
        p->ready = api_resume;
        p->ctx = req;
        TAILQ_INSERT_TAIL(&api->suspended, req, link);
        req->suspended = true;
        req->waited = true;
        MHD_suspend_connection(conn);
        return MHD_YES;
    }
    return api_send(api, conn, &out);
}

static void api_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                          enum MHD_RequestTerminationCode toe)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    if (ci && ci->socket_context)
        clock_gettime(CLOCK_MONOTONIC, &((struct api_conn *)ci->socket_context)->progress);
    struct api_request *req = *con_cls;
    if (req) {
        if (req->pending) {
            /* Closed with its answer still to come: the write frees it when it ends. */
            if (req->pending->done) {
                api_pending_free(req->pending);
            } else {
                req->pending->orphan = true;
                req->pending->ready = NULL;
                if (req->suspended)
                    TAILQ_REMOVE(&req->api->suspended, req, link);
            }
        }
        free(req->body);
        free(req);
    }
    *con_cls = NULL;
}

/* After every MHD_run: wake up again when MHD says it has timed work (or work now). */
static void api_schedule(struct api *api)
{
    MHD_UNSIGNED_LONG_LONG ms = 0;
    if (MHD_get_timeout(api->mhd, &ms) == MHD_YES) {
        struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
        evtimer_add(api->ev_timer, &tv);
    } else {
        evtimer_del(api->ev_timer);
    }
}

static void api_run_cb(evutil_socket_t fd, short what, void *arg)
{
    struct api *api = arg;
    MHD_run(api->mhd);
    api_schedule(api);
}

/* Counting connections ourselves lets the refusal of api.max_connections show in /metrics
 * (MHD's own limit refuses silently). */
static void api_notify_connection(void *cls, struct MHD_Connection *conn, void **socket_ctx,
                                  enum MHD_ConnectionNotificationCode toe)
{
    struct api *api = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        api->open_connections++;
        struct api_conn *ac = calloc(1, sizeof(*ac));
        if (ac) {
            ac->conn = conn;
            clock_gettime(CLOCK_MONOTONIC, &ac->progress);
            const union MHD_ConnectionInfo *ci =
                MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
            if (ci && ci->client_addr) {
                socklen_t len = ci->client_addr->sa_family == AF_INET6
                                    ? sizeof(struct sockaddr_in6)
                                    : sizeof(struct sockaddr_in);
                memcpy(&ac->peer, ci->client_addr, len);
            }
            TAILQ_INSERT_TAIL(&api->conns, ac, link);
        }
        *socket_ctx = ac;
        return;
    }
    if (api->open_connections > 0)
        api->open_connections--;
    struct api_conn *ac = *socket_ctx;
    if (ac) {
        TAILQ_REMOVE(&api->conns, ac, link);
        free(ac);
        *socket_ctx = NULL;
    }
}

/* Shuts down connections whose request is overdue; MHD then sees the socket closed and
 * frees them in its own time (we never free them here). */
static void api_mhd_log_flush(struct api *api, time_t now);

static void api_sweep_cb(evutil_socket_t fd, short what, void *arg)
{
    struct api *api = arg;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    api_mhd_log_flush(api, now.tv_sec);
    struct api_conn *ac;
    TAILQ_FOREACH(ac, &api->conns, link) {
        if (now.tv_sec - ac->progress.tv_sec <= api->srv->cfg->api_connection_timeout)
            continue;
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(ac->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (ci) {
            log_debug("api", "closing a connection whose request is overdue");
            shutdown(ci->connect_fd, SHUT_RDWR);
        }
        ac->progress = now;  /* once is enough; MHD closes it on its next run */
    }
}

/* Connections one address may hold when the API listens beyond loopback: an eighth of
 * api.max_connections (32 of 256), so one peer that keeps idle connections open
 * (reopening each the sweep closes) cannot take every place and lock the operator and
 * /health out. On loopback every peer is this machine (a local user can do worse; a
 * reverse proxy there is all its clients), so only api.max_connections applies. */
static unsigned api_per_source(const struct api *api)
{
    return (unsigned)netaddr_source_share((size_t)api->srv->cfg->api_max_connections);
}

static unsigned api_conns_from(const struct api *api, const struct sockaddr *addr)
{
    unsigned n = 0;
    const struct api_conn *ac;
    TAILQ_FOREACH(ac, &api->conns, link)
        n += netaddr_same_source((const struct sockaddr *)&ac->peer, addr);
    return n;
}

/* Connections open from addresses outside api.allowed_ips. */
static unsigned api_conns_outside(const struct api *api)
{
    unsigned n = 0;
    const struct api_conn *ac;
    TAILQ_FOREACH(ac, &api->conns, link)
        n += !api_peer_allowed(api->srv->cfg, (const struct sockaddr *)&ac->peer);
    return n;
}

/* Addresses outside api.allowed_ips still get their 403 (SPEC §3), so they are accepted,
 * but all of them together hold at most one address's share, and each answer closes its
 * connection: however many addresses an outsider has, the operators inside keep the rest
 * of api.max_connections. */
static enum MHD_Result api_accept_policy(void *cls, const struct sockaddr *addr,
                                         socklen_t addrlen)
{
    struct api *api = cls;
    const struct config *cfg = api->srv->cfg;
    unsigned from = 0;
    bool full = api->open_connections >= (unsigned)cfg->api_max_connections;
    bool outside = !full && !api_peer_allowed(cfg, addr);
    /* A peer of a loopback API is this machine; a client a trusted balancer's header named
     * (trusted_proxies) is elsewhere and gets the share as on any other address. */
    bool local = api_guard_is_loopback(cfg->api_listen_addr) && !api->via_balancer;
    if (outside) {
        if ((from = api_conns_outside(api)) < api_per_source(api))
            return MHD_YES;
    } else if (!full && (local || (from = api_conns_from(api, addr)) < api_per_source(api)))
        return MHD_YES;
    api->srv->limits.api_connections++;
    unsigned long held;
    if (log_limit_take(&api->refused_log, time(NULL), 10, &held)) {
        char who[64];
        netaddr_format(addr, who, sizeof(who));
        if (full)
            log_warn("api", "connection from %s refused: %u open (api.max_connections); %lu "
                            "more refused in the last 10 s",
                     who, api->open_connections, held);
        else if (outside)
            log_warn("api", "connection from %s refused: addresses outside api.allowed_ips "
                            "have %u open, an eighth of api.max_connections; %lu more refused "
                            "in the last 10 s",
                     who, from, held);
        else
            log_warn("api", "connection from %s refused: it has %u open, an eighth of "
                            "api.max_connections; %lu more refused in the last 10 s",
                     who, from, held);
    }
    return MHD_NO;
}

/* ---- libmicrohttpd's messages ---- */

/* Replaces control characters (a peer's bytes can reach MHD's messages) and drops the
 * trailing newline MHD puts on each. */
static void api_mhd_log_clean(char *s)
{
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r'))
        s[--n] = '\0';
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            *s = '?';
}

static void api_mhd_log_summary(struct api_mhd_log *k)
{
    if (k->suppressed)
        log_warn("api", "libmicrohttpd: %lu more like \"%s\" in the last %d s", k->suppressed,
                 k->last, API_MHD_LOG_WINDOW);
    k->suppressed = 0;
}

/* Says how many lines of each kind were held back once their window is over. */
static void api_mhd_log_flush(struct api *api, time_t now)
{
    for (size_t i = 0; i < API_MHD_LOG_KINDS; i++) {
        struct api_mhd_log *k = &api->mhd_log[i];
        if (k->fmt && k->suppressed && now - k->window_start >= API_MHD_LOG_WINDOW) {
            api_mhd_log_summary(k);
            k->window_start = now;
        }
    }
}

/* MHD_OPTION_EXTERNAL_LOGGER. MHD can report the same trouble (out of descriptors, a
 * peer's bad request) thousands of times a second; each kind — its format string, which
 * is a literal in MHD — gets at most one line per API_MHD_LOG_WINDOW seconds, and the sweep
 * reports how many were held back. Kinds beyond the table share its last slot. */
static void api_mhd_log(void *cls, const char *fmt, va_list ap)
{
    struct api *api = cls;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    struct api_mhd_log *k = &api->mhd_log[API_MHD_LOG_KINDS - 1];
    for (size_t i = 0; i < API_MHD_LOG_KINDS; i++) {
        if (api->mhd_log[i].fmt == fmt || !api->mhd_log[i].fmt) {
            k = &api->mhd_log[i];
            break;
        }
    }
    char line[sizeof(k->last)];
    vsnprintf(line, sizeof(line), fmt, ap);
    api_mhd_log_clean(line);
    if (k->fmt == fmt && now.tv_sec - k->window_start < API_MHD_LOG_WINDOW) {
        k->suppressed++;
        memcpy(k->last, line, sizeof(k->last));
        return;
    }
    api_mhd_log_summary(k); /* what this slot held back comes before the new line */
    k->fmt = fmt;
    k->window_start = now.tv_sec;
    k->suppressed = 0;
    log_warn("api", "libmicrohttpd: %s", line);
}

/* ---- accepting ---- */

/* Connections are accepted by our evconnlistener and handed to MHD. MHD's own listen
 * socket, out of descriptors, either busy-waits (no API connection open: the epoll fd stays
 * readable, so the loop spins and MHD logs a line per turn) or stops polling it until one of
 * its own connections closes. The guard instead pauses accepting for 100 ms and retries, so
 * the API answers again as soon as any descriptor is free, without spinning. */
static void api_add_connection(struct api *api, evutil_socket_t fd, const struct sockaddr *sa,
                               socklen_t salen, bool via_balancer)
{
    /* MHD closes fd itself when it refuses it (api_accept_policy, which it calls from
     * here and which reads via_balancer; out of memory). */
    api->via_balancer = via_balancer;
    if (MHD_add_connection(api->mhd, fd, sa, salen) != MHD_YES)
        log_debug("api", "connection not taken by libmicrohttpd");
    api->via_balancer = false;
    MHD_run(api->mhd);
    api_schedule(api);
}

static void api_accept_from(evutil_socket_t fd, const struct sockaddr *sa, socklen_t salen,
                            void *arg)
{
    api_add_connection(arg, fd, sa, salen, true);
}

/* From a trusted balancer the connection waits for its PROXY header first, so
 * api.allowed_ips and the per-source share see the client behind it. */
static void api_accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
                          int salen, void *arg)
{
    struct api *api = arg;
    if (!proxy_waits_trusted(api->srv->cfg, sa)) {
        api_add_connection(api, fd, sa, (socklen_t)salen, false);
        return;
    }
    /* Full: api.max_connections refuses it (api_accept_policy), counted as such. */
    size_t max = (size_t)api->srv->cfg->api_max_connections;
    size_t room = api->open_connections < max ? max - api->open_connections : 0;
    if (room == 0)
        api_add_connection(api, fd, sa, (socklen_t)salen, true);
    else
        proxy_waits_add(api->proxy_waits, fd, sa, (socklen_t)salen, room);
}

static void api_accept_error_cb(struct evconnlistener *l, void *arg)
{
    struct api *api = arg;
    accept_guard_on_error(api->accept_guard);
}

/* Binds without SO_REUSEPORT, so a second server on the same API port fails at start
 * instead of silently sharing (and splitting) the API's connections. */
static int api_start_listener(struct api *api, char *err, size_t errlen)
{
    const struct config *cfg = api->srv->cfg;
    struct sockaddr_storage ss;
    socklen_t sslen = 0;
    if (netaddr_ip_sockaddr(cfg->api_listen_addr, (uint16_t)cfg->api_listen_port, &ss,
                            &sslen) < 0) {
        snprintf(err, errlen, "api.listen_addr %s is not an IP address", cfg->api_listen_addr);
        return -1;
    }
    api->listener = evconnlistener_new_bind(
        api->srv->base, api_accept_cb, api,
        LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, API_BACKLOG,
        (struct sockaddr *)&ss, (int)sslen);
    if (!api->listener) {
        int e = EVUTIL_SOCKET_ERROR();
        snprintf(err, errlen, "cannot listen on %s:%d for the API: %s", cfg->api_listen_addr,
                 cfg->api_listen_port, strerror(e));
        return -1;
    }
    evconnlistener_set_error_cb(api->listener, api_accept_error_cb);
    api->accept_guard = accept_guard_new(api->srv->base, api->listener, "api", "API");
    api->proxy_waits = proxy_waits_new(api->srv->base, "api", api_accept_from, api,
                                       &api->srv->limits.proxy_header);
    if (!api->accept_guard || !api->proxy_waits) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);
    evutil_socket_t lfd = evconnlistener_get_fd(api->listener);
    api->port = cfg->api_listen_port;
    if (getsockname(lfd, (struct sockaddr *)&bound, &blen) == 0)
        api->port = bound.ss_family == AF_INET6
                        ? ntohs(((struct sockaddr_in6 *)&bound)->sin6_port)
                        : ntohs(((struct sockaddr_in *)&bound)->sin_port);
    api->srv->api_port = api->port; /* for loop_guard, which must not include api.h */
    return 0;
}

static int api_start_daemon(struct api *api, char *err, size_t errlen)
{
    const struct config *cfg = api->srv->cfg;
    api->mhd = MHD_start_daemon(
        MHD_USE_EPOLL | MHD_USE_ERROR_LOG | MHD_USE_NO_LISTEN_SOCKET |
            MHD_ALLOW_SUSPEND_RESUME, 0, api_accept_policy,
        api, api_access, api,
        MHD_OPTION_EXTERNAL_LOGGER, api_mhd_log, api,
        MHD_OPTION_NOTIFY_COMPLETED, api_completed, api,
        MHD_OPTION_NOTIFY_CONNECTION, api_notify_connection, api,
        /* A little above ours, so api_accept_policy is what refuses (and counts). */
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)cfg->api_max_connections + 4,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->api_connection_timeout,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(128 * 1024),
        MHD_OPTION_END);
    if (!api->mhd) {
        snprintf(err, errlen, "cannot start libmicrohttpd for the API");
        return -1;
    }
    return 0;
}

struct api *api_new(struct server *srv, char *err, size_t errlen)
{
    struct api *api = calloc(1, sizeof(*api));
    if (!api) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    api->srv = srv;
    TAILQ_INIT(&api->conns);
    TAILQ_INIT(&api->suspended);
    if (api_start_daemon(api, err, errlen) < 0 || api_start_listener(api, err, errlen) < 0)
        goto fail;
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(api->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    if (!di) {
        snprintf(err, errlen, "libmicrohttpd has no epoll support");
        goto fail;
    }
    api->ev_io = event_new(srv->base, di->epoll_fd, EV_READ | EV_PERSIST, api_run_cb, api);
    api->ev_timer = evtimer_new(srv->base, api_run_cb, api);
    api->ev_sweep = event_new(srv->base, -1, EV_PERSIST, api_sweep_cb, api);
    struct timeval one_second = {1, 0};
    if (!api->ev_io || !api->ev_timer || !api->ev_sweep || event_add(api->ev_io, NULL) < 0 ||
        event_add(api->ev_sweep, &one_second) < 0) {
        snprintf(err, errlen, "cannot register the API with the event loop");
        goto fail;
    }
    api_schedule(api);
    return api;
fail:
    api_free(api);
    return NULL;
}

void api_free(struct api *api)
{
    if (!api)
        return;
    /* The listener first: nothing new reaches MHD while it stops. */
    accept_guard_free(api->accept_guard);
    if (api->listener)
        evconnlistener_free(api->listener);
    proxy_waits_free(api->proxy_waits);
    if (api->ev_io)
        event_free(api->ev_io);
    if (api->ev_timer)
        event_free(api->ev_timer);
    if (api->ev_sweep)
        event_free(api->ev_sweep);
    if (api->mhd) {
        /* MHD refuses to stop with suspended connections: answer them first (503), and
         * give the answers already in one run to leave. */
        api_resume_all(api);
        MHD_run(api->mhd);
        MHD_stop_daemon(api->mhd);
    }
    free(api);
}

int api_port(const struct api *api) { return api->port; }

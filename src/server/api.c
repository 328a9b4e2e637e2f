/* HTTP API on libmicrohttpd, driven from the server's libevent loop.
 *
 * Why not MHD's own thread: every mapping, listener and counter belongs to the one event
 * loop; a second thread would need a lock around all of them or a request queue. Instead MHD
 * runs in external mode with MHD_USE_EPOLL: its epoll fd is one libevent read event and its
 * timeout one libevent timer, and MHD_run() is called from those callbacks. So every request
 * handler runs on the loop thread and touches the registry directly, without locks; a create
 * (bind + one SQLite transaction) is short enough to run inline. */
#include "api.h"

#include <arpa/inet.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/event.h>
#include <jansson.h>
#include <microhttpd.h>

#include "config.h"
#include "log.h"
#include "loop_guard.h"
#include "mapping.h"
#include "mapping_request.h"
#include "metrics.h"
#include "secret.h"
#include "server.h"
#include "tunnel_server.h"
#include "web.h"

#define API_MAX_BODY (64 * 1024)
#define API_STATUS_SLOTS 600

struct api {
    struct server *srv;
    struct MHD_Daemon *mhd;
    struct event *ev_io;
    struct event *ev_timer;
    int port;
    unsigned open_connections;     /* counted by api_notify_connection */
    TAILQ_HEAD(, api_conn) conns;  /* every open connection, for the slow-request sweep */
    struct event *ev_sweep;
    uint64_t status_count[API_STATUS_SLOTS];
};

/* Per connection. MHD's connection timeout only counts idle time, so a client that
 * trickles one byte every second would hold its slot for ever; the sweep closes any
 * connection that has not finished a request within api.connection_timeout. */
struct api_conn {
    TAILQ_ENTRY(api_conn) link;
    struct MHD_Connection *conn;
    struct timespec progress;      /* connected, or last request completed */
};

/* Per request, kept by MHD between calls of the access handler. */
struct api_request {
    char *body;
    size_t len;
    bool too_large;
};

enum api_method { M_GET = 1, M_POST = 2 };

typedef enum MHD_Result (*api_handler)(struct api *api, struct MHD_Connection *conn,
                                       const char *url, struct api_request *req);

struct api_route {
    const char *path;      /* exact path, or a prefix when it ends with '/' */
    unsigned methods;
    bool needs_token;
    api_handler handler;
};

static enum MHD_Result api_queue(struct api *api, struct MHD_Connection *conn, unsigned status,
                                 const char *type, char *body, size_t len, const char *allow)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (allow)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
    enum MHD_Result r = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    if (status < API_STATUS_SLOTS)
        api->status_count[status]++;
    return r;
}

/* Sends json (stolen) with the given status. */
static enum MHD_Result api_reply_json(struct api *api, struct MHD_Connection *conn,
                                      unsigned status, json_t *json, const char *allow)
{
    char *text = json ? json_dumps(json, JSON_COMPACT) : NULL;
    json_decref(json);
    if (!text)
        return MHD_NO;
    return api_queue(api, conn, status, "application/json", text, strlen(text), allow);
}

static enum MHD_Result api_fail(struct api *api, struct MHD_Connection *conn,
                                enum api_error e, const char *msg, const char *allow)
{
    json_t *j = json_pack("{s:b, s:s, s:s}", "success", 0, "message", msg, "error",
                          api_error_code(e));
    return api_reply_json(api, conn, api_error_status(e), j, allow);
}

static enum MHD_Result api_ok(struct api *api, struct MHD_Connection *conn, unsigned status,
                              const char *msg, json_t *data)
{
    json_t *j = json_pack("{s:b, s:s, s:o}", "success", 1, "message", msg, "data", data);
    return api_reply_json(api, conn, status, j, NULL);
}

static enum MHD_Result handle_health(struct api *api, struct MHD_Connection *conn,
                                     const char *url, struct api_request *req)
{
    struct server *srv = api->srv;
    size_t clients = srv->tunnel ? tunnel_server_client_count(srv->tunnel) : 0;
    json_t *j = json_pack("{s:s, s:b, s:b, s:I, s:I, s:s, s:I}", "status", "ok",
                          "tunnel_enabled", srv->cfg->tunnel_enabled, "tunnel_connected",
                          clients > 0, "clients", (json_int_t)clients, "mappings",
                          (json_int_t)mapping_registry_count(srv->mappings), "version",
                          PORTMUX_VERSION, "uptime_s",
                          (json_int_t)(time(NULL) - srv->started_at));
    return api_reply_json(api, conn, MHD_HTTP_OK, j, NULL);
}

static enum MHD_Result handle_create(struct api *api, struct MHD_Connection *conn,
                                     const char *url, struct api_request *req)
{
    struct mapping_record rec;
    char msg[256];
    enum api_error e = mapping_request_parse_create(api->srv->cfg, req->body ? req->body : "",
                                                    req->len, &rec, msg, sizeof(msg));
    if (e != API_OK)
        return api_fail(api, conn, e, msg, NULL);
    if (loop_guard_check_create(api->srv, &rec, msg, sizeof(msg)) != 0)
        return api_fail(api, conn, API_E_INVALID_FIELD, msg, NULL);
    struct mapping *m = NULL;
    enum mapping_result r =
        mapping_registry_create(api->srv->mappings, &rec, &m, msg, sizeof(msg));
    if (r != MAPPING_OK) {
        log_warn("api", "create port %d refused: %s", rec.port, msg);
        return api_fail(api, conn, r == MAPPING_E_IN_USE ? API_E_PORT_IN_USE : API_E_INTERNAL,
                        msg, NULL);
    }
    log_info("api", "mapping created: port %d -> %s%s:%d", rec.port,
             rec.use_tunnel ? "tunnel " : "", mapping_target_host(m), rec.target_port);
    return api_ok(api, conn, MHD_HTTP_CREATED, "mapping created", mapping_to_json(m));
}

static enum MHD_Result handle_remove(struct api *api, struct MHD_Connection *conn,
                                     const char *url, struct api_request *req)
{
    int port = 0;
    char msg[256];
    enum api_error e = mapping_request_parse_remove(req->body ? req->body : "", req->len, &port,
                                                    msg, sizeof(msg));
    if (e != API_OK)
        return api_fail(api, conn, e, msg, NULL);
    enum mapping_result r = mapping_registry_remove(api->srv->mappings, port);
    if (r == MAPPING_E_NOT_FOUND) {
        snprintf(msg, sizeof(msg), "no mapping on port %d", port);
        return api_fail(api, conn, API_E_NOT_FOUND, msg, NULL);
    }
    if (r != MAPPING_OK)
        return api_fail(api, conn, API_E_INTERNAL, "database error", NULL);
    log_info("api", "mapping removed: port %d", port);
    return api_ok(api, conn, MHD_HTTP_OK, "mapping removed", json_pack("{s:i}", "port", port));
}

static enum MHD_Result handle_list(struct api *api, struct MHD_Connection *conn,
                                   const char *url, struct api_request *req)
{
    json_t *arr = json_array();
    for (struct mapping *m = mapping_registry_first(api->srv->mappings); m;
         m = mapping_registry_next(m))
        json_array_append_new(arr, mapping_to_json(m));
    json_t *data = json_pack("{s:o, s:I}", "mappings", arr, "count",
                             (json_int_t)mapping_registry_count(api->srv->mappings));
    return api_ok(api, conn, MHD_HTTP_OK, "ok", data);
}

static enum MHD_Result handle_clients(struct api *api, struct MHD_Connection *conn,
                                      const char *url, struct api_request *req)
{
    json_t *data = api->srv->tunnel ? tunnel_server_clients_json(api->srv->tunnel)
                                    : json_pack("{s:[], s:i}", "clients", "count", 0);
    return api_ok(api, conn, MHD_HTTP_OK, "ok", data);
}

static enum MHD_Result handle_metrics(struct api *api, struct MHD_Connection *conn,
                                      const char *url, struct api_request *req)
{
    size_t len = 0;
    char *text = metrics_render(api->srv, &len);
    if (!text)
        return api_fail(api, conn, API_E_INTERNAL, "out of memory", NULL);
    return api_queue(api, conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", text,
                     len, NULL);
}

static enum MHD_Result handle_console(struct api *api, struct MHD_Connection *conn,
                                      const char *url, struct api_request *req)
{
    const struct web_asset *a = web_find(url);
    if (!a)
        return api_fail(api, conn, API_E_NOT_FOUND, "no such page", NULL);
    struct MHD_Response *resp = MHD_create_response_from_buffer(
        a->len, (void *)a->data, MHD_RESPMEM_PERSISTENT);
    if (!resp)
        return MHD_NO;
    web_add_headers(resp, a);
    enum MHD_Result r = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    api->status_count[MHD_HTTP_OK]++;
    return r;
}

static const struct api_route api_routes[] = {
    {"/health", M_GET, false, handle_health},
    {"/api/mapping/create", M_POST, true, handle_create},
    {"/api/mapping/remove", M_POST, true, handle_remove},
    {"/api/mapping/list", M_GET, true, handle_list},
    {"/api/clients", M_GET, true, handle_clients},
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

static bool api_peer_allowed(struct api *api, struct MHD_Connection *conn)
{
    const struct config *cfg = api->srv->cfg;
    if (cfg->allowed_ips_len == 0)
        return true;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (!ci || !ci->client_addr)
        return false;
    for (size_t i = 0; i < cfg->allowed_ips_len; i++)
        if (netaddr_cidr_match(&cfg->allowed_ips[i], ci->client_addr))
            return true;
    return false;
}

static bool api_token_ok(struct api *api, struct MHD_Connection *conn)
{
    const char *token = api->srv->cfg->api_token;
    if (!token || !*token)
        return true;
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    if (!h || strncmp(h, "Bearer ", 7) != 0)
        return false;
    return secret_equal(token, h + 7, strlen(h + 7));
}

static const char *api_allow_header(unsigned methods)
{
    return methods == M_GET ? "GET, HEAD" : methods == M_POST ? "POST" : "GET, HEAD, POST";
}

/* First call for a request: every check that needs no body, so refusals never read it.
 * Returns true when the request may go on; otherwise *r holds the queued refusal. */
static bool api_admit(struct api *api, struct MHD_Connection *conn, const char *url,
                      const char *method, enum MHD_Result *r)
{
    if (!api_peer_allowed(api, conn)) {
        *r = api_fail(api, conn, API_E_FORBIDDEN, "address not allowed", NULL);
        return false;
    }
    const struct api_route *route = api_route_find(url);
    if (!route) {
        *r = api_fail(api, conn, API_E_NOT_FOUND, "no such endpoint", NULL);
        return false;
    }
    /* HEAD goes wherever GET does; MHD leaves the body out. */
    unsigned m = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0 ? M_GET
                 : strcmp(method, "POST") == 0                             ? M_POST
                                                                           : 0;
    if (!(m & route->methods)) {
        *r = api_fail(api, conn, API_E_METHOD_NOT_ALLOWED, "method not allowed",
                      api_allow_header(route->methods));
        return false;
    }
    if (route->needs_token && !api_token_ok(api, conn)) {
        *r = api_fail(api, conn, API_E_UNAUTHORIZED, "missing or wrong bearer token", NULL);
        return false;
    }
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
    if (cl && strtoull(cl, NULL, 10) > API_MAX_BODY) {
        *r = api_fail(api, conn, API_E_BODY_TOO_LARGE, "body over 64 KiB", NULL);
        return false;
    }
    return true;
}

static enum MHD_Result api_access(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
    struct api *api = cls;
    struct api_request *req = *con_cls;
    if (!req) {
        enum MHD_Result r = MHD_YES;
        if (!api_admit(api, conn, url, method, &r))
            return r;
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
    if (req->too_large)
        return api_fail(api, conn, API_E_BODY_TOO_LARGE, "body over 64 KiB", NULL);
    return api_route_find(url)->handler(api, conn, url, req);
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
static void api_sweep_cb(evutil_socket_t fd, short what, void *arg)
{
    struct api *api = arg;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
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

static enum MHD_Result api_accept_policy(void *cls, const struct sockaddr *addr,
                                         socklen_t addrlen)
{
    struct api *api = cls;
    if (api->open_connections < (unsigned)api->srv->cfg->api_max_connections)
        return MHD_YES;
    api->srv->limits.api_connections++;
    log_debug("api", "connection refused: %u open (api.max_connections)",
              api->open_connections);
    return MHD_NO;
}

static int api_bind_addr(const char *addr, int port, struct sockaddr_storage *ss,
                         unsigned *flags)
{
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *sin = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, addr, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        return 0;
    }
    if (inet_pton(AF_INET6, addr, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        *flags |= MHD_USE_IPv6;
        return 0;
    }
    return -1;
}

static int api_start_daemon(struct api *api, char *err, size_t errlen)
{
    const struct config *cfg = api->srv->cfg;
    struct sockaddr_storage ss;
    unsigned flags = MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
    if (api_bind_addr(cfg->api_listen_addr, cfg->api_listen_port, &ss, &flags) < 0) {
        snprintf(err, errlen, "api.listen_addr %s is not an IP address", cfg->api_listen_addr);
        return -1;
    }
    api->mhd = MHD_start_daemon(
        flags, (uint16_t)cfg->api_listen_port, api_accept_policy, api, api_access, api,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
        MHD_OPTION_NOTIFY_COMPLETED, api_completed, api,
        MHD_OPTION_NOTIFY_CONNECTION, api_notify_connection, api,
        /* A little above ours, so api_accept_policy is what refuses (and counts). */
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)cfg->api_max_connections + 4,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->api_connection_timeout,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(128 * 1024),
        MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned)1,
        MHD_OPTION_END);
    if (!api->mhd) {
        snprintf(err, errlen, "cannot start the API on %s:%d (address in use?)",
                 cfg->api_listen_addr, cfg->api_listen_port);
        return -1;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(api->mhd, MHD_DAEMON_INFO_BIND_PORT);
    api->port = di ? di->port : cfg->api_listen_port;
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
    if (api_start_daemon(api, err, errlen) < 0)
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
    if (api->ev_io)
        event_free(api->ev_io);
    if (api->ev_timer)
        event_free(api->ev_timer);
    if (api->ev_sweep)
        event_free(api->ev_sweep);
    if (api->mhd)
        MHD_stop_daemon(api->mhd);
    free(api);
}

int api_port(const struct api *api) { return api->port; }

void api_foreach_status_count(const struct api *api,
                              void (*fn)(unsigned status, uint64_t count, void *arg), void *arg)
{
    for (unsigned s = 0; s < API_STATUS_SLOTS; s++)
        if (api->status_count[s])
            fn(s, api->status_count[s], arg);
}

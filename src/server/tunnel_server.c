/* The server's tunnel endpoint: the listener (TLS optional), Hello authentication and
 * takeover, one session per client name. A session's socket, TLS and KeepAlive are a
 * mux_conn (mux_conn.c); its public connections are tunnel streams (tunnel_stream.c).
 * Sessions and streams live in the one event loop; nothing here locks. */
#include "tunnel_server.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <jansson.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "accept_guard.h"
#include "bridge.h"
#include "client_name.h"
#include "clients.h"
#include "config.h"
#include "frame.h"
#include "hello_limit.h"
#include "log.h"
#include "log_limit.h"
#include "mapping.h"
#include "mux.h"
#include "mux_conn.h"
#include "netaddr.h"
#include "proxy_wait.h"
#include "secret.h"
#include "server.h"
#include "tls_bev.h"
#include "tls_error.h"
#include "tunnel_tls.h"
#include "tunnel_stream.h"

#define TS_MOD "tunnel"
/* A connection without a Hello keeps its place while tunnel.max_pending is full for a
 * tenth of tunnel.hello_timeout (1 s by default; ts_pending_make_room). */
#define TS_PENDING_EVICT_SHARE 10
/* A refused or closing tunnel gets this long to flush its last frames. */
#define TS_CLOSE_GRACE_SECONDS 5
#define TS_NAME_MAX 64
/* Bytes of JSON the mapping list in a HelloResponse or Notice may take: a JSON frame holds
 * FRAME_MAX_JSON (4 KiB), and the rest of the HelloResponse (message, client) needs room;
 * a list over it would make the frame unencodable and the HelloResponse never sent. */
#define TS_HELLO_MAPPINGS_BUDGET (FRAME_MAX_JSON - 512u)
/* The node list's share of the HelloResponse (and of a "nodes" Notice): the nodes in
 * order (this one first) while they fit, each advertise being up to 255 characters. Its
 * size comes off the mappings' budget, so the whole answer stays within one JSON frame
 * (a larger one is not sent at all: the client would wait for an answer that never
 * comes). */
#define TS_HELLO_NODES_BUDGET 2048u
/* Nodes a client is told of at most: itself and the 32 others portmux-client keeps a
 * session to (STATUS_NODES_MAX). */
#define TS_NODES_TOLD_MAX 33

struct tsession {
    TAILQ_ENTRY(tsession) link;
    TAILQ_ENTRY(tsession) pending_link; /* in ts->pending while pending */
    struct tunnel_server *ts;
    struct mux_conn *conn;        /* the socket, TLS, the mux session, KeepAlive */
    struct mux_session *mux;      /* mux_conn_mux(conn) */
    struct event *hello_timer;    /* Hello deadline, then the closing grace period */
    char name[TS_NAME_MAX + 1];   /* set on successful Hello (or while probing for it) */
    char remote[64];
    char source[64];              /* remote without the port: what the Hello limits key on */
    struct sockaddr_storage peer; /* the source address the Hello limits key on */
    /* Takeover (SPEC §4): this session's Hello named a client with a live session, which
     * is being probed with a KeepAlive echo; probe_old is cleared if it goes away. */
    struct event *probe_timer;
    struct tsession *probe_old;
    uint64_t probe_echoes;        /* probe_old's echo count when the probe was sent */
    bool probing;
    time_t connected_at;
    bool authed;
    bool pending;                 /* counted in ts->npending: no successful Hello yet */
    int64_t accepted_ms;          /* ts_now_ms() at accept */
    struct tunnel_stream_set streams; /* public connections and their counters */
    bool notices;                 /* its Hello said "notices": true (docs/PROTOCOL.md) */
    char *notice_last;            /* the last mappings Notice it was sent (or would be) */
    char *nodes_last;             /* the last "nodes" list it was told (HelloResponse/Notice) */
};

struct tunnel_server {
    struct server *srv;
    struct evconnlistener *listener;
    struct accept_guard *accept_guard;
    SSL_CTX *ssl;
    int port;
    TAILQ_HEAD(, tsession) sessions;
    struct hello_limit *hello_limit;
    struct proxy_waits *proxy_waits; /* from trusted_proxies, before their header */
    TAILQ_HEAD(, tsession) pending; /* sessions without a successful Hello yet */
    size_t npending;              /* their number (max_pending) */
    struct log_limit pending_log; /* "max_pending reached": one line per 10 s */
    /* HelloResponse's "nodes" (SPEC §7): who knows the cluster's live nodes (main.c wires
     * it to the cluster sync); NULL without a cluster. */
    struct json_t *(*nodes_json)(void *arg);
    void *nodes_arg;
    /* Re-reads the node list every TS_NODES_CHECK_SECONDS and tells each client that asked
     * for notices when it changed, so portmux-client connects a joining node within 10 s
     * (SPEC §7) without a re-Hello. */
    struct event *nodes_timer;
};

#define TS_NODES_CHECK_SECONDS 2

static void ts_nodes_tick(evutil_socket_t fd, short what, void *arg);

void tunnel_server_set_nodes_source(struct tunnel_server *ts,
                                    struct json_t *(*fn)(void *arg), void *arg)
{
    if (!ts)
        return;
    ts->nodes_json = fn;
    ts->nodes_arg = arg;
    if (fn && !ts->nodes_timer) {
        ts->nodes_timer = event_new(ts->srv->base, -1, EV_PERSIST, ts_nodes_tick, ts);
        struct timeval tv = {TS_NODES_CHECK_SECONDS, 0};
        if (!ts->nodes_timer || event_add(ts->nodes_timer, &tv) != 0)
            log_error(TS_MOD, "cannot start the node list timer: clients learn nodes only "
                              "when they connect");
    }
}

static void tsession_close(struct tsession *sess, const char *reason);

static int64_t ts_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* A warning a peer can trigger before it is authenticated: at most one per kind per
 * source per HELLO_LIMIT_LOG_MS, the next one saying how many were held back. */
__attribute__((format(printf, 3, 4)))
static void ts_peer_warn(struct tsession *sess, enum hello_log_kind kind, const char *fmt, ...)
{
    uint64_t suppressed = 0;
    if (!hello_limit_log(sess->ts->hello_limit, (const struct sockaddr *)&sess->peer, kind,
                         ts_now_ms(), &suppressed))
        return;
    char line[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (suppressed)
        log_warn(TS_MOD, "%s (%llu more like it from this address suppressed)", line,
                 (unsigned long long)suppressed);
    else
        log_warn(TS_MOD, "%s", line);
}

/* ---- sessions ---- */

static struct tsession *ts_find_client(const struct tunnel_server *ts, const char *name)
{
    struct tsession *sess;
    TAILQ_FOREACH(sess, &ts->sessions, link) {
        if (sess->authed && !mux_conn_closing(sess->conn) && strcmp(sess->name, name) == 0)
            return sess;
    }
    return NULL;
}

/* The session no longer counts against tunnel.max_pending. */
static void tsession_unpend(struct tsession *sess)
{
    if (sess->pending) {
        sess->pending = false;
        sess->ts->npending--;
        TAILQ_REMOVE(&sess->ts->pending, sess, pending_link);
    }
}

static void tsession_free(struct tsession *sess)
{
    struct tunnel_server *ts = sess->ts;
    tsession_unpend(sess);
    TAILQ_REMOVE(&ts->sessions, sess, link);
    struct tsession *other;
    TAILQ_FOREACH(other, &ts->sessions, link) {
        if (other->probe_old == sess)
            other->probe_old = NULL; /* gone: the prober takes over when its timer fires */
    }
    if (sess->authed && !mux_conn_closing(sess->conn) && ts->srv->mappings)
        mapping_registry_client_down(ts->srv->mappings, sess->name);
    if (sess->authed && !mux_conn_closing(sess->conn) && ts->srv->clients)
        clients_touch(ts->srv->clients, sess->name, (int64_t)time(NULL));
    /* Streams still waiting or bridged close through their on_close callbacks. */
    mux_conn_free(sess->conn);
    tunnel_stream_set_detach(&sess->streams);
    if (sess->hello_timer)
        event_free(sess->hello_timer);
    if (sess->probe_timer)
        event_free(sess->probe_timer);
    free(sess->notice_last);
    free(sess->nodes_last);
    free(sess);
}

/* " (N more ... held back)" after a client's session line, or "" when none was. */
static const char *ts_session_held_note(char *buf, size_t len, unsigned long held)
{
    if (!held)
        return "";
    snprintf(buf, len, " (%lu more lines about this client's sessions held back in the last "
                       "%d s)", held, CLIENTS_SESSION_LOG_PERIOD);
    return buf;
}

/* A line about an authenticated session, within the client's budget (a client with the
 * token decides how often its sessions start and end). */
static bool ts_session_log_take(struct tsession *sess, char *note, size_t len)
{
    unsigned long held;
    bool ok = clients_session_log_take(sess->ts->srv->clients, sess->name, time(NULL), &held);
    ts_session_held_note(note, len, held);
    return ok;
}

static void tsession_close(struct tsession *sess, const char *reason)
{
    char note[112] = "";
    if (sess->authed) {
        if (ts_session_log_take(sess, note, sizeof(note)))
            log_info(TS_MOD, "client \"%s\" disconnected: %s%s", sess->name, reason, note);
    } else
        log_debug(TS_MOD, "tunnel from %s closed: %s", sess->remote, reason);
    tsession_free(sess);
}

/* Flushes what is queued (a HelloResponse), then closes; never waits long. */
static void tsession_close_after_flush(struct tsession *sess)
{
    struct timeval tv = {TS_CLOSE_GRACE_SECONDS, 0};
    if (mux_conn_close_after_flush(sess->conn)) {
        tsession_free(sess);
        return;
    }
    evtimer_add(sess->hello_timer, &tv);
}

static void tsession_protocol_error(struct tsession *sess, const char *what)
{
    sess->ts->srv->limits.tunnel_protocol_errors++;
    char note[112] = "";
    if (sess->authed) {
        if (ts_session_log_take(sess, note, sizeof(note)))
            log_warn(TS_MOD, "client \"%s\" disconnected: protocol error: %s%s", sess->name,
                     what, note);
    } else
        ts_peer_warn(sess, HELLO_LOG_PROTOCOL, "tunnel from %s closed: protocol error: %s",
                     sess->remote, what);
    tsession_free(sess);
}

static void tsession_hello_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tsession *sess = arg;
    if (mux_conn_closing(sess->conn)) {
        tsession_free(sess);
        return;
    }
    sess->ts->srv->limits.tunnel_hello_timeout++;
    ts_peer_warn(sess, HELLO_LOG_TIMEOUT, "tunnel from %s closed: no Hello within %d s",
                 sess->remote, sess->ts->srv->cfg->hello_timeout);
    tsession_free(sess);
}

/* ---- Hello ---- */

/* Sends j (stolen) as the HelloResponse. */
static void tsession_respond(struct tsession *sess, json_t *j)
{
    if (mux_conn_send_json(sess->conn, FRAME_HELLO_RESPONSE, j) < 0)
        log_error(TS_MOD, "tunnel from %s: the HelloResponse could not be sent (larger than "
                          "a JSON frame, or out of memory)", sess->remote);
}

/* Refuses the Hello: the answer is flushed, then the tunnel closes. */
static int tsession_refuse(struct tsession *sess, const char *message, const char *error)
{
    tsession_respond(sess, json_pack("{s:b, s:s, s:s}", "ok", 0, "message", message, "error",
                                     error));
    return MUX_STOPPED;
}

/* The tunnel mappings the client serves, [{"port":P,"target":"host:port"}], so that it can
 * show "tcp://server:P -> target". Targets are spelt as the client spells what it dials.
 * In the HelloResponse, and again in a Notice when it changes (tsession_notify_mappings). */
static json_t *ts_client_mappings_json(const struct tunnel_server *ts, const char *name,
                                       size_t budget)
{
    json_t *arr = json_array();
    struct mapping *m = ts->srv->mappings ? mapping_registry_first(ts->srv->mappings) : NULL;
    for (; m && arr; m = mapping_registry_next(m)) {
        const char *client = client_name_or_default(m->rec.client);
        if (!m->rec.use_tunnel || !m->listener || strcmp(client, name) != 0)
            continue;
        char target[FRAME_MAX_HOST + 10];
        const char *host = mapping_target_host(m);
        snprintf(target, sizeof(target), strchr(host, ':') ? "[%s]:%d" : "%s:%d", host,
                 m->rec.target_port);
        /* Keep the HelloResponse far below one frame, however many mappings there are. */
        size_t cost = strlen(target) + 32;
        if (cost > budget)
            break;
        budget -= cost;
        json_array_append_new(arr, json_pack("{s:i, s:s}", "port", m->rec.port, "target",
                                             target));
    }
    return arr;
}

/* The client's mappings as a Notice, sent only when they differ from the last one it
 * was told (the HelloResponse's list primes it with send false), so an API change that
 * does not concern this client costs it nothing. */
static void tsession_notify_mappings(struct tsession *sess, bool send)
{
    json_t *j = json_pack("{s:s, s:o}", "event", "mappings", "mappings",
                          ts_client_mappings_json(sess->ts, sess->name,
                                                  TS_HELLO_MAPPINGS_BUDGET));
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!text)
        return;
    if (sess->notice_last && strcmp(sess->notice_last, text) == 0) {
        free(text);
        return;
    }
    if (send)
        mux_session_send_json(sess->mux, FRAME_NOTICE, text, strlen(text));
    free(sess->notice_last);
    sess->notice_last = text;
}

/* The node list as the client was told it; a "nodes" Notice when it differs (send false:
 * the HelloResponse just carried it). nodes is borrowed. */
static void tsession_notify_nodes(struct tsession *sess, const char *nodes, bool send)
{
    if (!nodes || (sess->nodes_last && strcmp(sess->nodes_last, nodes) == 0))
        return;
    char *copy = strdup(nodes);
    if (!copy)
        return;
    if (send) {
        json_t *j = json_pack("{s:s, s:o}", "event", "nodes", "nodes",
                              json_loads(nodes, 0, NULL));
        char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        int rc = text ? mux_session_send_json(sess->mux, FRAME_NOTICE, text, strlen(text)) : -1;
        free(text);
        if (rc < 0) { /* not told: the next tick tries again */
            free(copy);
            return;
        }
    }
    free(sess->nodes_last);
    sess->nodes_last = copy;
}

/* The live nodes' advertise addresses as the client is told them: in order while they fit
 * TS_HELLO_NODES_BUDGET (dumped, compact), at most as many as a client keeps sessions to.
 * NULL without a cluster. */
static char *ts_nodes_text(const struct tunnel_server *ts)
{
    json_t *all = ts->nodes_json ? ts->nodes_json(ts->nodes_arg) : NULL;
    if (!all)
        return NULL;
    json_t *kept = json_array();
    size_t used = 2, i; /* the brackets */
    json_t *v;
    json_array_foreach(all, i, v) {
        const char *a = json_string_value(v);
        size_t cost = a ? strlen(a) + 3 : 0; /* quotes and comma; advertise is printable */
        if (!a || !kept || used + cost > TS_HELLO_NODES_BUDGET || i >= TS_NODES_TOLD_MAX)
            break;
        used += cost;
        json_array_append(kept, v);
    }
    json_decref(all);
    char *text = kept ? json_dumps(kept, JSON_COMPACT) : NULL;
    json_decref(kept);
    return text;
}

static void ts_nodes_tick(evutil_socket_t fd, short what, void *arg)
{
    struct tunnel_server *ts = arg;
    char *text = ts_nodes_text(ts);
    struct tsession *sess;
    TAILQ_FOREACH(sess, &ts->sessions, link) {
        if (text && sess->authed && !mux_conn_closing(sess->conn) && sess->notices)
            tsession_notify_nodes(sess, text, true);
    }
    free(text);
}

void tunnel_server_mappings_changed(struct tunnel_server *ts)
{
    if (!ts)
        return;
    struct tsession *sess;
    TAILQ_FOREACH(sess, &ts->sessions, link) {
        if (sess->authed && !mux_conn_closing(sess->conn) && sess->notices)
            tsession_notify_mappings(sess, true);
    }
}

static void tsession_accept(struct tsession *sess, const char *name)
{
    const struct config *cfg = sess->ts->srv->cfg;
    char msg[128];
    snprintf(sess->name, sizeof(sess->name), "%s", name);
    sess->authed = true;
    sess->probing = false;
    tsession_unpend(sess);
    sess->connected_at = time(NULL);
    evtimer_del(sess->hello_timer);
    mux_session_set_open(sess->mux);
    snprintf(msg, sizeof(msg), "welcome, %s", name);
    /* What the client's status block shows about itself (SPEC §4a, issue 15). */
    const struct clients_entry *ce =
        sess->ts->srv->clients ? clients_find(sess->ts->srv->clients, name) : NULL;
    json_t *self = ce ? json_pack("{s:s, s:I, s:I}", "source",
                                  ce->source == CLIENTS_SOURCE_CONFIG ? "config" : "api",
                                  "takeovers", (json_int_t)ce->takeovers, "refused",
                                  (json_int_t)ce->refused)
                      : NULL;
    char *nodes_text = ts_nodes_text(sess->ts);
    json_t *nodes = nodes_text ? json_loads(nodes_text, 0, NULL) : NULL;
    size_t budget = TS_HELLO_MAPPINGS_BUDGET - (nodes_text ? strlen(nodes_text) : 0);
    tsession_respond(sess, json_pack("{s:b, s:s, s:o*, s:o*, s:o*}", "ok", 1, "message", msg,
                                     "mappings",
                                     ts_client_mappings_json(sess->ts, sess->name, budget),
                                     "client", self, "nodes", nodes));
    if (sess->notices)
        tsession_notify_mappings(sess, false);
    if (sess->notices)
        tsession_notify_nodes(sess, nodes_text, false);
    free(nodes_text);
    mux_conn_start_keepalive(sess->conn,
                             cfg->heartbeat_interval > 0 ? cfg->heartbeat_interval : 10,
                             cfg->heartbeat_timeout > 0 ? cfg->heartbeat_timeout : 30);
    if (sess->ts->srv->clients)
        clients_touch(sess->ts->srv->clients, sess->name, (int64_t)sess->connected_at);
    if (sess->ts->srv->mappings)
        mapping_registry_client_up(sess->ts->srv->mappings, sess->name);
    char note[112] = "";
    if (ts_session_log_take(sess, note, sizeof(note)))
        log_info(TS_MOD, "client \"%s\" connected from %s%s", sess->name, sess->remote, note);
}

/* A Hello refused before its credentials were looked at, or because they were wrong:
 * counts towards the source's limit. */
static int tsession_refuse_failed(struct tsession *sess, enum hello_log_kind kind,
                                  const char *message, const char *error, const char *why)
{
    struct tunnel_server *ts = sess->ts;
    /* Once per block per source, but many sources (IPv6 /64s cost nothing) must not
     * write one line each: through the same global cap as the other peer lines. */
    if (hello_limit_failure(ts->hello_limit, (const struct sockaddr *)&sess->peer,
                            ts_now_ms()))
        ts_peer_warn(sess, HELLO_LOG_BLOCKED, "%d failed Hellos from %s within %d s: its "
                     "Hellos are refused for %d s", HELLO_LIMIT_FAILURES, sess->source,
                     HELLO_LIMIT_WINDOW_MS / 1000, HELLO_LIMIT_BLOCK_MS / 1000);
    ts_peer_warn(sess, kind, "tunnel from %s: %s", sess->remote, why);
    return tsession_refuse(sess, message, error);
}

/* The probe's verdict: the old session echoed (it keeps its place) or it did not (it is
 * closed with its streams and this one takes over). */
static void tsession_probe_done(evutil_socket_t fd, short what, void *arg)
{
    struct tsession *sess = arg;
    struct tunnel_server *ts = sess->ts;
    struct tsession *old = sess->probe_old;
    char msg[192], reason[160];
    sess->probe_old = NULL;
    if (old && mux_session_keepalive_echoes(old->mux) != sess->probe_echoes) {
        ts->srv->limits.tunnel_already_connected++;
        if (ts->srv->clients)
            clients_note(ts->srv->clients, sess->name, CLIENTS_EVENT_REFUSED);
        ts_peer_warn(sess, HELLO_LOG_ALREADY_CONNECTED,
                     "tunnel from %s: client \"%s\" refused: already connected from %s, "
                     "which answered the probe", sess->remote, sess->name, old->remote);
        snprintf(msg, sizeof(msg), "client \"%s\" is already connected", sess->name);
        sess->probing = false;
        sess->name[0] = '\0';
        tsession_refuse(sess, msg, "already_connected");
        tsession_close_after_flush(sess);
        return;
    }
    if (!old && ts_find_client(ts, sess->name)) {
        /* The old one left and another Hello took the name meanwhile. */
        snprintf(msg, sizeof(msg), "client \"%s\" is already connected", sess->name);
        sess->probing = false;
        sess->name[0] = '\0';
        tsession_refuse(sess, msg, "already_connected");
        tsession_close_after_flush(sess);
        return;
    }
    if (old) {
        ts->srv->limits.tunnel_takeovers++;
        if (ts->srv->clients)
            clients_note(ts->srv->clients, sess->name, CLIENTS_EVENT_TAKEOVER);
        log_warn(TS_MOD, "client \"%s\": session from %s did not answer within %d ms, "
                         "taken over by %s", sess->name, old->remote,
                 ts->srv->cfg->takeover_probe_ms, sess->remote);
        snprintf(reason, sizeof(reason), "taken over by a new session from %s", sess->remote);
        tsession_close(old, reason);
    }
    char name[TS_NAME_MAX + 1];
    snprintf(name, sizeof(name), "%s", sess->name);
    tsession_accept(sess, name);
    /* Frames that came behind the Hello wait in the input; nothing wakes us for them. */
    mux_conn_resume_read(sess->conn);
}

/* Probes old, the live session of the name this Hello authenticated as (SPEC §4). */
static int tsession_start_probe(struct tsession *sess, struct tsession *old, const char *name)
{
    struct tunnel_server *ts = sess->ts;
    char msg[192];
    struct tsession *other;
    TAILQ_FOREACH(other, &ts->sessions, link) {
        if (other->probing && other->probe_old == old) {
            /* One probe at a time: a third Hello for the name meanwhile is refused as
             * one the old session answered for would be (already_connected), not queued. */
            ts->srv->limits.tunnel_already_connected++;
            ts_peer_warn(sess, HELLO_LOG_ALREADY_CONNECTED,
                         "tunnel from %s: client \"%s\" refused: a takeover is in progress",
                         sess->remote, name);
            snprintf(msg, sizeof(msg), "client \"%s\" is already connected", name);
            return tsession_refuse(sess, msg, "already_connected");
        }
    }
    sess->probe_timer = evtimer_new(ts->srv->base, tsession_probe_done, sess);
    if (!sess->probe_timer) {
        snprintf(msg, sizeof(msg), "client \"%s\" is already connected", name);
        return tsession_refuse(sess, msg, "already_connected");
    }
    snprintf(sess->name, sizeof(sess->name), "%s", name);
    sess->probing = true;
    sess->probe_old = old;
    sess->probe_echoes = mux_session_keepalive_echoes(old->mux);
    mux_session_send_keepalive(old->mux);
    evtimer_del(sess->hello_timer);
    int ms = ts->srv->cfg->takeover_probe_ms > 0 ? ts->srv->cfg->takeover_probe_ms : 2000;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(sess->probe_timer, &tv);
    log_warn(TS_MOD, "client \"%s\": new Hello from %s while connected from %s: probing the "
                     "old session", name, sess->remote, old->remote);
    return MUX_STOPPED;
}

static int tsession_on_hello(struct tsession *sess, json_t *root)
{
    struct tunnel_server *ts = sess->ts;
    const char *name = NULL, *token = NULL, *version = "";
    char shown[TS_NAME_MAX + 1], msg[192], why[192];
    if (hello_limit_blocked(ts->hello_limit, (const struct sockaddr *)&sess->peer,
                            ts_now_ms())) {
        ts->srv->limits.tunnel_rate_limited++;
        ts_peer_warn(sess, HELLO_LOG_RATE_LIMITED,
                     "tunnel from %s: Hello refused unchecked: too many failures", sess->remote);
        return tsession_refuse(sess, "too many failed Hellos from this address; try later",
                               "rate_limited");
    }
    if (json_unpack(root, "{s:s, s:s, s?s}", "name", &name, "token", &token, "version",
                    &version) != 0 ||
        !clients_name_valid(name)) {
        ts->srv->limits.tunnel_protocol_errors++;
        return tsession_refuse_failed(sess, HELLO_LOG_BAD_HELLO, "malformed Hello", "bad_hello",
                                      "closed: protocol error: malformed Hello (a name is "
                                      "1-64 characters of A-Z a-z 0-9 . _ -)");
    }
    /* name is [A-Za-z0-9._-]{1,64} from here on: safe to log and to copy whole. */
    sess->notices = json_is_true(json_object_get(root, "notices"));
    /* "optimistic": the client holds Data that comes before its ConnectResponse, so a
     * stream's first bytes need not wait for its dial (docs/PROTOCOL.md). */
    if (json_is_true(json_object_get(root, "optimistic")))
        mux_session_set_early_data(sess->mux);
    snprintf(shown, sizeof(shown), "%s", name);
    json_t *jtoken = json_object_get(root, "token");
    if (!ts->srv->clients ||
        !clients_check(ts->srv->clients, name, token, json_string_length(jtoken),
                       (int64_t)time(NULL))) {
        ts->srv->limits.tunnel_auth_failed++;
        snprintf(why, sizeof(why), "client \"%s\" refused: unknown name or wrong token", shown);
        snprintf(msg, sizeof(msg), "authentication failed for client \"%s\"", shown);
        return tsession_refuse_failed(sess, HELLO_LOG_AUTH_FAILED, msg, "auth_failed", why);
    }
    struct tsession *old = ts_find_client(ts, name);
    if (old)
        return tsession_start_probe(sess, old, shown);
    tsession_accept(sess, shown);
    return MUX_OK;
}

static int tsession_on_json(struct mux_session *mux, uint8_t type, const char *json,
                            size_t len, void *arg)
{
    struct tsession *sess = arg;
    if (sess->authed)
        return -1; /* a second Hello */
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root || !json_is_object(root)) {
        json_decref(root);
        sess->ts->srv->limits.tunnel_protocol_errors++;
        hello_limit_failure(sess->ts->hello_limit, (const struct sockaddr *)&sess->peer,
                            ts_now_ms());
        ts_peer_warn(sess, HELLO_LOG_BAD_HELLO,
                     "tunnel from %s closed: protocol error: Hello is not a JSON object",
                     sess->remote);
        return tsession_refuse(sess, "malformed Hello", "bad_hello");
    }
    int rc = tsession_on_hello(sess, root);
    json_decref(root);
    return rc;
}

static const struct mux_session_callbacks tsession_mux_cb = {.on_json = tsession_on_json};

/* ---- session I/O ---- */

/* The mux stopped reading: a protocol error, a Hello refused (flush the answer, then
 * close), or a takeover probe under way (hold the rest of the input until it decides). */
static void tsession_on_stop(struct mux_conn *conn, int rc, void *arg)
{
    struct tsession *sess = arg;
    if (rc < 0)
        tsession_protocol_error(sess, mux_session_error(sess->mux));
    else if (sess->probing)
        mux_conn_hold_read(conn);
    else
        tsession_close_after_flush(sess);
}

static void tsession_on_flushed(struct mux_conn *conn, void *arg)
{
    tsession_free(arg);
}

/* The first OpenSSL reason on bev, or NULL. Drains the error queue. */
static const char *ts_tls_reason(struct bufferevent *bev)
{
    const char *reason = NULL;
    unsigned long e;
    while ((e = bufferevent_get_openssl_error(bev)) != 0) {
        if (!reason)
            reason = ERR_reason_error_string(e);
    }
    return reason;
}

/* The alert OpenSSL queued for the peer when a handshake failed (unknown ca, handshake
 * failure) waits in the socket layer's buffer, and freeing the session dropped it: the
 * client learnt only "connection closed" and retried for ever instead of stopping at
 * the reason. One non-blocking write of it (a few bytes, to a socket that has sent
 * nothing else) before the close. */
static void ts_tls_send_alert(struct bufferevent *bev)
{
    struct bufferevent *sock = tls_bev_socket(bev);
    evutil_socket_t fd = bufferevent_getfd(sock);
    struct evbuffer *out = bufferevent_get_output(sock);
    if (sock == bev || fd < 0 || evbuffer_get_length(out) == 0)
        return;
    /* A socket bufferevent keeps its output's front frozen outside its own writes. */
    evbuffer_unfreeze(out, 1);
    (void)evbuffer_write(out, fd);
    evbuffer_freeze(out, 1);
}

static void tsession_on_event(struct mux_conn *conn, short what, void *arg)
{
    struct tsession *sess = arg;
    struct bufferevent *bev = mux_conn_bev(conn);
    char reason[160];
    if (what & BEV_EVENT_CONNECTED)
        return; /* TLS handshake done */
    if (mux_conn_closing(sess->conn)) {
        tsession_free(sess);
        return;
    }
    const char *tls = sess->ts->ssl ? ts_tls_reason(bev) : NULL;
    if (what & BEV_EVENT_TIMEOUT) {
        snprintf(reason, sizeof(reason), "%s for %d s (heartbeat timeout)",
                 what & BEV_EVENT_WRITING ? "peer not reading" : "no data",
                 sess->ts->srv->cfg->heartbeat_timeout);
    } else if (tls) {
        snprintf(reason, sizeof(reason), "TLS error: %s", tls);
        ts_tls_send_alert(bev);
        if (!sess->authed) {
            sess->ts->srv->limits.tunnel_protocol_errors++;
            ts_peer_warn(sess, HELLO_LOG_TLS, "tunnel from %s closed: %s", sess->remote, reason);
        }
    } else if (what & BEV_EVENT_EOF) {
        snprintf(reason, sizeof(reason), "connection closed by peer");
    } else {
        snprintf(reason, sizeof(reason), "%s",
                 evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
    }
    tsession_close(sess, reason);
}

static const struct mux_conn_hooks tsession_conn_hooks = {
    .on_stop = tsession_on_stop,
    .on_event = tsession_on_event,
    .on_flushed = tsession_on_flushed,
};

static struct tsession *tsession_new(struct tunnel_server *ts, evutil_socket_t fd,
                                     const struct sockaddr *sa)
{
    struct event_base *base = ts->srv->base;
    struct tsession *sess = calloc(1, sizeof(*sess));
    if (!sess) {
        evutil_closesocket(fd);
        return NULL;
    }
    sess->ts = ts;
    tunnel_stream_set_init(&sess->streams, sess->name);
    netaddr_format(sa, sess->remote, sizeof(sess->remote));
    snprintf(sess->source, sizeof(sess->source), "%s", sess->remote);
    char *colon = strrchr(sess->source, ':');
    if (colon)
        *colon = '\0';
    if (sa->sa_family == AF_INET6)
        memcpy(&sess->peer, sa, sizeof(struct sockaddr_in6));
    else if (sa->sa_family == AF_INET)
        memcpy(&sess->peer, sa, sizeof(struct sockaddr_in));
    SSL *ssl = NULL;
    if (ts->ssl && !(ssl = SSL_new(ts->ssl)))
        goto fail;
    sess->conn = mux_conn_new(base, fd, ssl, BUFFEREVENT_SSL_ACCEPTING, 0, MUX_ROLE_SERVER,
                              &tsession_mux_cb, &tsession_conn_hooks, sess);
    fd = -1; /* the conn's now, or closed */
    if (!sess->conn)
        goto fail;
    sess->mux = mux_conn_mux(sess->conn);
    mux_session_set_buffer_limit(sess->mux, (size_t)ts->srv->cfg->session_buffer_limit);
    sess->hello_timer = evtimer_new(base, tsession_hello_timer_cb, sess);
    if (!sess->hello_timer)
        goto fail;
    return sess;
fail:
    mux_conn_free(sess->conn);
    if (fd >= 0)
        evutil_closesocket(fd);
    free(sess);
    return NULL;
}

/* Connections one source may hold waiting for their Hello: an eighth of max_pending (16
 * of the default 128), so one address cannot take every place and lock the clients out. */
static size_t ts_pending_per_source(const struct tunnel_server *ts)
{
    return netaddr_source_share((size_t)ts->srv->cfg->tunnel_max_pending);
}

static size_t ts_pending_from(const struct tunnel_server *ts, const struct sockaddr *sa)
{
    size_t n = 0;
    const struct tsession *sess;
    TAILQ_FOREACH(sess, &ts->pending, pending_link)
        n += netaddr_same_source((const struct sockaddr *)&sess->peer, sa);
    return n;
}

/* A tunnel connection whose source is known: the peer's, or the client a trusted
 * balancer's PROXY header names. */
/* tunnel.max_pending is full: the connection that has waited longest for its Hello makes
 * room, once it has waited a tenth of hello_timeout (a client's handshake takes less).
 * Without this, eight sources holding their share of idle connections, renewed every
 * hello_timeout, kept every client out; now they would have to renew all of them ten
 * times as often. Returns true when a place was freed. */
static bool ts_pending_make_room(struct tunnel_server *ts)
{
    struct tsession *oldest = TAILQ_FIRST(&ts->pending);
    int hello = ts->srv->cfg->hello_timeout > 0 ? ts->srv->cfg->hello_timeout : 10;
    if (!oldest || ts_now_ms() - oldest->accepted_ms < hello * 1000 / TS_PENDING_EVICT_SHARE)
        return false;
    ts->srv->limits.tunnel_pending++;
    tsession_close(oldest, "no Hello yet, and its place was needed (tunnel.max_pending)");
    return true;
}

static void ts_accept_from(evutil_socket_t fd, const struct sockaddr *sa, socklen_t socklen,
                           void *arg)
{
    struct tunnel_server *ts = arg;
    if (mapping_fd_in_reserve(fd)) {
        /* Idle connections to the tunnel port must not take the API's descriptors. */
        ts->srv->limits.descriptors++;
        log_debug(TS_MOD, "tunnel connection refused: descriptors nearly exhausted");
        evutil_closesocket(fd);
        return;
    }
    size_t from_source = ts_pending_from(ts, sa);
    if (ts->npending >= (size_t)ts->srv->cfg->tunnel_max_pending &&
        from_source < ts_pending_per_source(ts))
        ts_pending_make_room(ts);
    if (ts->npending >= (size_t)ts->srv->cfg->tunnel_max_pending ||
        from_source >= ts_pending_per_source(ts)) {
        /* Idle connections that never say Hello must not pin descriptors and memory
         * without bound: the newest is closed at once. */
        ts->srv->limits.tunnel_pending++;
        unsigned long held;
        if (log_limit_take(&ts->pending_log, time(NULL), 10, &held)) {
            char who[64];
            log_warn(TS_MOD, "tunnel from %s closed at accept: %zu connections waiting for "
                             "their Hello (tunnel.max_pending), %zu of them from its "
                             "address (at most %zu); %lu more since the last such line",
                     netaddr_format(sa, who, sizeof(who)), ts->npending, from_source,
                     ts_pending_per_source(ts), held);
        }
        evutil_closesocket(fd);
        return;
    }
    bridge_set_nodelay(fd);
    struct tsession *sess = tsession_new(ts, fd, sa);
    if (!sess) {
        log_error(TS_MOD, "out of memory accepting a tunnel connection");
        return;
    }
    int hello = ts->srv->cfg->hello_timeout > 0 ? ts->srv->cfg->hello_timeout : 10;
    struct timeval tv = {hello, 0};
    evtimer_add(sess->hello_timer, &tv);
    TAILQ_INSERT_TAIL(&ts->sessions, sess, link);
    sess->pending = true;
    sess->accepted_ms = ts_now_ms();
    ts->npending++;
    TAILQ_INSERT_TAIL(&ts->pending, sess, pending_link);
    log_debug(TS_MOD, "tunnel connection from %s", sess->remote);
}

static void ts_accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
                         int socklen, void *arg)
{
    struct tunnel_server *ts = arg;
    /* Waiting for a header counts against max_pending as a whole: the per-source share
     * is checked once the header names the source. When no place is left the refusal is
     * max_pending's own (counted and logged as such). */
    size_t total = (size_t)ts->srv->cfg->tunnel_max_pending;
    size_t room = ts->npending < total ? total - ts->npending : 0;
    if (!proxy_waits_trusted(ts->srv->cfg, sa) || room == 0 || mapping_fd_in_reserve(fd))
        ts_accept_from(fd, sa, (socklen_t)socklen, ts);
    else
        proxy_waits_add(ts->proxy_waits, fd, sa, (socklen_t)socklen, room);
}

static void ts_accept_error_cb(struct evconnlistener *l, void *arg)
{
    struct tunnel_server *ts = arg;
    if (ts->accept_guard)
        accept_guard_on_error(ts->accept_guard);
}

/* ---- server ---- */

static int ts_listen(struct tunnel_server *ts, char *err, size_t errlen)
{
    const struct config *cfg = ts->srv->cfg;
    struct sockaddr_storage ss;
    socklen_t sslen;
    char spec[300];
    const char *addr = cfg->tunnel_listen_addr ? cfg->tunnel_listen_addr : "0.0.0.0";
    snprintf(spec, sizeof(spec), strchr(addr, ':') ? "[%s]:%d" : "%s:%d", addr,
             cfg->tunnel_listen_port);
    if (netaddr_ip_sockaddr(addr, (uint16_t)cfg->tunnel_listen_port, &ss, &sslen) != 0) {
        snprintf(err, errlen, "tunnel.listen_addr %s is not an IP address", addr);
        return -1;
    }
    ts->listener = evconnlistener_new_bind(
        ts->srv->base, ts_accept_cb, ts,
        LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 128,
        (struct sockaddr *)&ss, (int)sslen);
    if (!ts->listener) {
        snprintf(err, errlen, "cannot listen on %s: %s", spec,
                 evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
        return -1;
    }
    evconnlistener_set_error_cb(ts->listener, ts_accept_error_cb);
    ts->accept_guard = accept_guard_new(ts->srv->base, ts->listener, TS_MOD, "tunnel listener");
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);
    ts->port = cfg->tunnel_listen_port;
    if (getsockname(evconnlistener_get_fd(ts->listener), (struct sockaddr *)&bound, &blen) == 0)
        ts->port = ntohs(bound.ss_family == AF_INET6
                             ? ((struct sockaddr_in6 *)&bound)->sin6_port
                             : ((struct sockaddr_in *)&bound)->sin_port);
    return 0;
}

struct tunnel_server *tunnel_server_new(struct server *srv, char *err, size_t errlen)
{
    const struct config *cfg = srv->cfg;
    struct tunnel_server *ts = calloc(1, sizeof(*ts));
    if (!ts) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    ts->srv = srv;
    TAILQ_INIT(&ts->sessions);
    TAILQ_INIT(&ts->pending);
    ts->hello_limit = hello_limit_new(HELLO_LIMIT_DEFAULT_SOURCES);
    ts->proxy_waits = proxy_waits_new(srv->base, "tunnel", ts_accept_from, ts,
                                      &srv->limits.proxy_header);
    if (!ts->hello_limit || !ts->proxy_waits) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (cfg->tls_cert_file && cfg->tls_cert_file[0]) {
        ts->ssl = tunnel_tls_new(cfg, err, errlen);
        if (!ts->ssl)
            goto fail;
    }
    if (ts_listen(ts, err, errlen) != 0)
        goto fail;
    if (ts->ssl) {
        log_info(TS_MOD, "TLS on%s", cfg->tls_client_ca && cfg->tls_client_ca[0]
                                         ? ", client certificates required"
                                         : "");
        tunnel_tls_check(cfg, ts->ssl);
    }
    return ts;
fail:
    SSL_CTX_free(ts->ssl);
    hello_limit_free(ts->hello_limit);
    proxy_waits_free(ts->proxy_waits);
    free(ts);
    return NULL;
}

void tunnel_server_free(struct tunnel_server *ts)
{
    if (!ts)
        return;
    accept_guard_free(ts->accept_guard);
    if (ts->nodes_timer)
        event_free(ts->nodes_timer);
    if (ts->listener)
        evconnlistener_free(ts->listener);
    proxy_waits_free(ts->proxy_waits);
    struct tsession *sess;
    while ((sess = TAILQ_FIRST(&ts->sessions)) != NULL)
        tsession_close(sess, "server shutting down");
    SSL_CTX_free(ts->ssl);
    hello_limit_free(ts->hello_limit);
    free(ts);
}

int tunnel_server_port(const struct tunnel_server *ts) { return ts->port; }

bool tunnel_server_client_connected(const struct tunnel_server *ts, const char *name)
{
    return ts_find_client(ts, client_name_or_default(name)) != NULL;
}

size_t tunnel_server_client_count(const struct tunnel_server *ts)
{
    size_t n = 0;
    const struct tsession *sess;
    TAILQ_FOREACH(sess, &ts->sessions, link) {
        if (sess->authed && !mux_conn_closing(sess->conn))
            n++;
    }
    return n;
}

static void tsession_info(const struct tsession *sess, struct tunnel_client_info *out)
{
    out->name = sess->name;
    out->remote_addr = sess->remote;
    out->connected_at = sess->connected_at;
    out->streams = sess->streams.nestablished;
    out->rtt_ms = mux_session_rtt_ms(sess->mux);
    out->bytes_in = sess->streams.bytes_in;
    out->bytes_out = sess->streams.bytes_out;
}

bool tunnel_server_client_info(const struct tunnel_server *ts, const char *name,
                               struct tunnel_client_info *out)
{
    const struct tsession *sess = ts ? ts_find_client(ts, name) : NULL;
    if (sess)
        tsession_info(sess, out);
    return sess != NULL;
}

size_t tunnel_server_clients_foreach(const struct tunnel_server *ts, tunnel_client_fn fn,
                                     void *arg)
{
    size_t n = 0;
    const struct tsession *sess;
    TAILQ_FOREACH(sess, &ts->sessions, link) {
        if (!sess->authed || mux_conn_closing(sess->conn))
            continue;
        struct tunnel_client_info info;
        tsession_info(sess, &info);
        fn(&info, arg);
        n++;
    }
    return n;
}

void tunnel_server_client_removed(struct tunnel_server *ts, const char *name)
{
    if (!ts)
        return;
    struct tsession *sess, *next;
    for (sess = TAILQ_FIRST(&ts->sessions); sess; sess = next) {
        next = TAILQ_NEXT(sess, link);
        if (mux_conn_closing(sess->conn) || strcmp(sess->name, name) != 0)
            continue;
        if (sess->authed) {
            /* Its mappings stay and wait: tunnel_server_forward finds no session. */
            tsession_close(sess, "client removed");
        } else if (sess->probing) {
            sess->probing = false;
            sess->probe_old = NULL;
            evtimer_del(sess->probe_timer);
            tsession_refuse(sess, "client removed", "auth_failed");
            tsession_close_after_flush(sess);
        }
    }
}

/* ---- public connections ---- */

void tunnel_server_forward(struct tunnel_server *ts, struct mapping *m, evutil_socket_t fd)
{
    const struct config *cfg = ts->srv->cfg;
    const char *client = client_name_or_default(m->rec.client);
    struct tsession *sess = ts_find_client(ts, client);
    if (!sess) {
        log_debug(TS_MOD, "port %d: client \"%s\" not connected", m->rec.port, client);
        mapping_dial_failed(m, "client \"%s\" not connected", client);
        tunnel_stream_refuse(m, fd);
        return;
    }
    /* Closed streams whose Close the client has not answered count too: each keeps its
     * entry until it does, and a client that never does would grow them for ever. */
    size_t open = sess->streams.nstreams + mux_session_closing_count(sess->mux);
    if (cfg->max_streams_per_client > 0 && open >= (size_t)cfg->max_streams_per_client) {
        ts->srv->limits.tunnel_streams++;
        /* Every public connection can hit this: the reason goes through the mapping's
         * rate-limited dial log, the line here is for debugging only. */
        log_debug(TS_MOD, "client \"%s\": stream refused, %zu open or closing (limit)",
                  sess->name, open);
        mapping_dial_failed(m, "client \"%s\" has %zu streams open or closing "
                            "(tunnel.max_streams_per_client)", sess->name, open);
        tunnel_stream_refuse(m, fd);
        return;
    }
    tunnel_stream_open(&sess->streams, sess->mux, ts->srv->base, m, fd, cfg->connect_timeout);
}

int tunnel_server_reload_tls(struct tunnel_server *ts)
{
    if (!ts || !ts->ssl)
        return 0;
    char err[512];
    SSL_CTX *next = tunnel_tls_new(ts->srv->cfg, err, sizeof(err));
    if (!next) {
        log_error(TS_MOD, "reload: the TLS files were not read again, the running "
                          "certificate stays: %s", err);
        return -1;
    }
    bool changed = tunnel_tls_differs(ts->ssl, next);
    /* Sessions hold their own reference to the context they began with. */
    SSL_CTX_free(ts->ssl);
    ts->ssl = next;
    tunnel_tls_check(ts->srv->cfg, next);
    return changed ? 1 : 0;
}

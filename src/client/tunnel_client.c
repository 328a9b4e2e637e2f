/* One tunnel session of portmux-client. Every bufferevent here defers its callbacks, so
 * a connect that fails at once reports from the loop, never from inside our own call. */
#include "tunnel_client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/dns.h>
#include <event2/event.h>
#include <jansson.h>

#include "allow.h"
#include "bridge.h"
#include "client_tls.h"
#include "frame.h"
#include "log.h"
#include "log_limit.h"
#include "mux.h"
#include "mux_conn.h"
#include "netaddr.h"
#include "status.h"
#include "tls_bev.h"

#define TC_MOD "client"
/* A session that stayed up this long resets the reconnect backoff. */
#define TC_HEALTHY_SECONDS 10
/* Lines a public client can cause per connection: at most one of each kind per this. */
#define TC_LOG_PERIOD 10
/* Session end lines the node sessions write together per TC_LOG_PERIOD (opts.end_log). */
#define TC_END_LINES 8
#define TC_BEV_OPTS (BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS)
/* Default for opts.max_pending_dials: ConnectRequests being dialled at once. Each holds a
 * descriptor and a timer until its target answers or connect_timeout passes; a server
 * flooding requests at a black-holed target gets status 1 beyond it instead of taking
 * every descriptor we have. Generous, because a burst of public connections arrives as
 * one batch of requests before any dial's completion is seen. */
#define TC_MAX_PENDING_DIALS 1024
/* Default for opts.max_streams: the server's own default tunnel.max_streams_per_client,
 * so a client left at its defaults never refuses what a server at its defaults sends. */
#define TC_MAX_STREAMS 10000

struct dial;

struct tclient {
    struct event_base *base;
    struct evdns_base *dns;
    struct tclient_opts opts;
    tclient_end_cb on_end;
    void *arg;
    /* The current session; conn == NULL between attempts. */
    struct mux_conn *conn;
    SSL *ssl;                    /* owned by conn */
    struct mux_session *mux;     /* mux_conn_mux(conn) */
    struct event *deadline;      /* connect + TLS + HelloResponse */
    bool connected;              /* TCP (and TLS) up */
    bool authed;
    bool ever_authed;
    bool already_connected;      /* the last attempt's Hello: "already_connected" */
    bool rate_limited;           /* the last attempt's Hello: "rate_limited" */
    struct timespec authed_at;
    size_t streams;              /* bridges alive */
    size_t ndials;               /* entries in dials */
    time_t dial_cap_logged;      /* last "too many pending dials" line (one per second) */
    unsigned long dial_cap_suppressed;
    /* Lines a public client causes once per connection (a refused or failed dial): one
     * per TC_LOG_PERIOD each, with a count of those held back. */
    struct log_limit not_allowed_log, dial_failed_log, dial_fail_log, streams_cap_log;
    char refusal[400];
    TAILQ_HEAD(, dial) dials;
};

/* A ConnectRequest being dialled. */
struct dial {
    TAILQ_ENTRY(dial) link;
    struct tclient *c;
    struct mux_stream *st;
    struct bufferevent *bev;
    struct event *timer;          /* connect_timeout; fired at once when connected_now */
    bool connected_now;           /* the connect completed inside connect() (loopback) */
    int failed_now;               /* or failed there: its errno */
    struct status_target *shown;  /* the target's row in the status */
    char target[FRAME_MAX_HOST + 10];
};

/* A dialled target bridged to its stream: what the bridge hooks update. */
struct served {
    struct tclient *c;
    struct status_target *shown;
};

static double tc_elapsed(const struct timespec *since)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - since->tv_sec) + (double)(now.tv_nsec - since->tv_nsec) / 1e9;
}

/* ---- dials ---- */

static void dial_free(struct dial *d, bool keep_bev)
{
    TAILQ_REMOVE(&d->c->dials, d, link);
    d->c->ndials--;
    if (d->c->opts.dials_total)
        (*d->c->opts.dials_total)--;
    if (d->timer)
        event_free(d->timer);
    if (d->bev && !keep_bev)
        bufferevent_free(d->bev);
    free(d);
}

/* to_socket came from the public side (in), to_stream goes back to it (out). */
static void dial_bridge_bytes(size_t to_stream, size_t to_socket, void *arg)
{
    struct served *sv = arg;
    status_target_bytes(sv->shown, to_socket, to_stream);
}

static void dial_bridge_close(const char *why, void *arg)
{
    struct served *sv = arg;
    sv->c->streams--;
    if (sv->c->opts.streams_total)
        (*sv->c->opts.streams_total)--;
    status_target_closed(sv->shown);
    free(sv);
}

static const struct bridge_hooks dial_hooks = {
    .on_bytes = dial_bridge_bytes,
    .on_close = dial_bridge_close,
    .log_module = TC_MOD,
};

/* " (N more such lines held back)" when N > 0, else "". */
static const char *tc_held_note(char *buf, size_t len, unsigned long held)
{
    if (held == 0)
        return "";
    snprintf(buf, len, " (%lu more such lines held back in the last %d s)", held,
             TC_LOG_PERIOD);
    return buf;
}

static void dial_fail(struct dial *d, uint8_t status, const char *why)
{
    /* Optimistic data the server sent ahead goes with the stream (the refusal frees it). */
    size_t held = mux_stream_held(d->st);
    char dropped[64] = "", note[80];
    unsigned long lines_held;
    if (held > 0)
        snprintf(dropped, sizeof(dropped), " (%zu bytes sent ahead dropped)", held);
    if (log_limit_take(&d->c->dial_failed_log, time(NULL), TC_LOG_PERIOD, &lines_held))
        log_info(TC_MOD, "stream %u: %s: %s%s%s", (unsigned)mux_stream_id(d->st), d->target,
                 why, dropped, tc_held_note(note, sizeof(note), lines_held));
    status_target_failed(d->shown, why);
    mux_stream_respond(d->st, status);
    dial_free(d, false);
}

static void dial_connected(struct dial *d)
{
    struct tclient *c = d->c;
    struct mux_stream *st = d->st;
    size_t held = mux_stream_held(st); /* optimistic data: bridge_new writes it first */
    if (mux_stream_respond(st, FRAME_STATUS_OK) != MUX_OK) {
        dial_free(d, false);
        return;
    }
    bridge_set_nodelay(bufferevent_getfd(d->bev)); /* before the held bytes go */
    struct served *sv = calloc(1, sizeof(*sv));
    struct bridge *b = sv ? bridge_new(st, d->bev, &dial_hooks, sv) : NULL;
    if (!b) {
        free(sv);
        mux_stream_close(st);
        dial_free(d, false);
        return;
    }
    sv->c = c;
    sv->shown = d->shown;
    log_debug(TC_MOD, "stream %u: connected to %s", (unsigned)mux_stream_id(st), d->target);
    if (held > 0)
        log_debug(TC_MOD, "stream %u: %zu bytes sent ahead written first",
                  (unsigned)mux_stream_id(st), held);
    c->streams++;
    if (c->opts.streams_total)
        (*c->opts.streams_total)++;
    status_target_opened(d->shown);
    dial_free(d, true);
}

static void dial_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct dial *d = arg;
    char why[160];
    if (what & BEV_EVENT_CONNECTED) {
        dial_connected(d);
        return;
    }
    int dns_err = bufferevent_socket_get_dns_error(bev);
    if (dns_err)
        snprintf(why, sizeof(why), "cannot resolve: %s", evutil_gai_strerror(dns_err));
    else
        snprintf(why, sizeof(why), "%s", evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
    dial_fail(d, FRAME_STATUS_REFUSED, why);
}

static void dial_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct dial *d = arg;
    if (d->connected_now)
        dial_connected(d);
    else if (d->failed_now)
        dial_fail(d, FRAME_STATUS_REFUSED, evutil_socket_error_to_string(d->failed_now));
    else
        dial_fail(d, FRAME_STATUS_TIMEOUT, "connect timed out");
}

/* Connects to an IP literal on the bufferevent's behalf. A target on this host (or one
 * that answers within the call) is connected when connect() returns, EINPROGRESS or not:
 * then the dial completes from the loop at once (the timer is made active), without the
 * EPOLLOUT registration, wake-up, SO_ERROR read and deregistration of a bufferevent
 * connect; otherwise the bufferevent waits for the connect as usual. */
static int dial_connect_ip(struct dial *d, const struct sockaddr *sa, socklen_t salen)
{
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    /* A new socket bufferevent has writing enabled, and setfd would register the socket
     * for EPOLLOUT at once, only for the bridge to drop that and register EPOLLIN: two
     * epoll_ctl per dial. The slow path below asks for EPOLLOUT itself. */
    bufferevent_disable(d->bev, EV_WRITE);
    if (bufferevent_setfd(d->bev, fd) != 0) {
        close(fd);
        return -1;
    }
    if (connect(fd, sa, salen) != 0 && errno != EINPROGRESS) {
        d->failed_now = errno;
    } else {
        struct sockaddr_storage peer;
        socklen_t len = sizeof(peer);
        if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0)
            return bufferevent_socket_connect(d->bev, NULL, 0);
        d->connected_now = true;
    }
    event_active(d->timer, EV_TIMEOUT, 1);
    return 0;
}

/* The server gave up on the stream, or the session is going away. */
static void dial_on_close(struct mux_stream *st, enum mux_close_reason why, void *arg)
{
    dial_free(arg, false);
}

static const struct mux_stream_callbacks dial_stream_cb = {.on_close = dial_on_close};

static int dial_start(struct tclient *c, struct mux_stream *st, const char *target,
                      const char *host, uint16_t port)
{
    struct dial *d = calloc(1, sizeof(*d));
    if (!d)
        return -1;
    d->c = c;
    d->st = st;
    snprintf(d->target, sizeof(d->target), "%s", target);
    d->shown = status_target_get(c->opts.status, target);
    TAILQ_INSERT_TAIL(&c->dials, d, link);
    c->ndials++;
    if (c->opts.dials_total)
        (*c->opts.dials_total)++;
    d->bev = bufferevent_socket_new(c->base, -1, TC_BEV_OPTS);
    d->timer = evtimer_new(c->base, dial_timeout_cb, d);
    if (!d->bev || !d->timer) {
        dial_free(d, false);
        return -1;
    }
    mux_stream_set_callbacks(st, &dial_stream_cb, d);
    bufferevent_setcb(d->bev, NULL, NULL, dial_event_cb, d);
    struct timeval tv = {c->opts.connect_timeout, 0};
    evtimer_add(d->timer, &tv);
    /* Errors, even immediate ones, come back through dial_event_cb (deferred). An IP
     * literal skips the resolver's parsing and address-list allocations. */
    struct sockaddr_storage sa;
    socklen_t salen;
    int rc = netaddr_ip_sockaddr(host, port, &sa, &salen) == 0
                 ? dial_connect_ip(d, (struct sockaddr *)&sa, salen)
                 : bufferevent_socket_connect_hostname(d->bev, c->dns, AF_UNSPEC, host, port);
    if (rc != 0) {
        mux_stream_set_callbacks(st, NULL, NULL);
        dial_free(d, false);
        return -1;
    }
    return 0;
}

static void tc_on_connect_request(struct mux_session *mux, struct mux_stream *st,
                                  const char *host, uint16_t port, void *arg)
{
    struct tclient *c = arg;
    char target[FRAME_MAX_HOST + 10];
    char literal[FRAME_MAX_HOST + 1];
    const char *why = "not in --allow";
    /* What is dialled must be what --allow judged: "[::1]" is the literal ::1 (allow_list
     * reads it so), never a name for the resolver; and anything that is neither an IP
     * literal nor a host name is refused rather than looked up. */
    size_t hn = strlen(host);
    if (hn >= 3 && host[0] == '[' && host[hn - 1] == ']' && hn - 2 < sizeof(literal)) {
        memcpy(literal, host + 1, hn - 2);
        literal[hn - 2] = '\0';
        if (netaddr_is_ip_literal(literal))
            host = literal;
    }
    bool dialable = netaddr_is_ip_literal(host) || netaddr_is_hostname(host);
    if (!dialable)
        why = "not an IP address or host name";
    /* Spelt as the server spells the targets it announces in the HelloResponse. */
    snprintf(target, sizeof(target), strchr(host, ':') ? "[%s]:%u" : "%s:%u", host,
             (unsigned)port);
    if (!dialable || !allow_list_match(c->opts.allow, host, port)) {
        char note[80];
        unsigned long held;
        if (log_limit_take(&c->not_allowed_log, time(NULL), TC_LOG_PERIOD, &held))
            log_warn(TC_MOD, "stream %u: %s refused: %s%s", (unsigned)mux_stream_id(st),
                     target, why, tc_held_note(note, sizeof(note), held));
        status_target_failed(status_target_get(c->opts.status, target), why);
        mux_stream_respond(st, FRAME_STATUS_NOT_ALLOWED);
        return;
    }
    size_t cap = c->opts.max_pending_dials > 0 ? (size_t)c->opts.max_pending_dials
                                               : TC_MAX_PENDING_DIALS;
    size_t pending = c->opts.dials_total ? *c->opts.dials_total : c->ndials;
    if (pending >= cap) {
        /* The flood is the server's doing: one line per second, with a count. */
        time_t now = time(NULL);
        if (now != c->dial_cap_logged) {
            log_warn(TC_MOD, "stream %u: %s refused: %zu dials already pending (%lu more "
                             "refused since the last such line)",
                     (unsigned)mux_stream_id(st), target, cap, c->dial_cap_suppressed);
            c->dial_cap_logged = now;
            c->dial_cap_suppressed = 0;
        } else {
            c->dial_cap_suppressed++;
        }
        mux_stream_respond(st, FRAME_STATUS_REFUSED);
        return;
    }
    size_t max_streams = c->opts.max_streams > 0 ? (size_t)c->opts.max_streams : TC_MAX_STREAMS;
    size_t bridged = c->opts.streams_total ? *c->opts.streams_total : c->streams;
    /* Streams this session closed whose Close the server has not answered keep their
     * entries until it does: a server that never does would grow them for ever. */
    size_t open = bridged + pending + mux_session_closing_count(mux);
    if (open >= max_streams) {
        char note[80];
        unsigned long held;
        if (log_limit_take(&c->streams_cap_log, time(NULL), TC_LOG_PERIOD, &held))
            log_warn(TC_MOD, "stream %u: %s refused: %zu streams already open or closing "
                             "(--max-streams)%s",
                     (unsigned)mux_stream_id(st), target, open,
                     tc_held_note(note, sizeof(note), held));
        status_target_failed(status_target_get(c->opts.status, target), "too many streams");
        mux_stream_respond(st, FRAME_STATUS_REFUSED);
        return;
    }
    if (dial_start(c, st, target, host, port) != 0) {
        /* Out of descriptors, most likely (the server decides how many streams are open):
         * said once per TC_LOG_PERIOD, with the count. */
        char note[80];
        unsigned long held;
        if (log_limit_take(&c->dial_fail_log, time(NULL), TC_LOG_PERIOD, &held))
            log_warn(TC_MOD, "stream %u: %s refused: cannot start a dial (%s)%s",
                     (unsigned)mux_stream_id(st), target, strerror(errno),
                     tc_held_note(note, sizeof(note), held));
        mux_stream_respond(st, FRAME_STATUS_REFUSED);
    }
}

/* ---- session ---- */

/* Frees the session; its streams and dials close through their on_close callbacks. */
static void tc_close_session(struct tclient *c)
{
    mux_conn_free(c->conn);
    c->conn = NULL;
    c->mux = NULL;
    c->ssl = NULL;
    event_del(c->deadline);
    c->connected = c->authed = false;
}

/* The session's state goes to its node row, or to the Session line of the --server one. */
static void tc_status_connecting(struct tclient *c)
{
    if (c->opts.node)
        status_node_connecting(c->opts.node);
    else
        status_connecting(c->opts.status);
}

static void tc_status_connected(struct tclient *c)
{
    if (c->opts.node)
        status_node_connected(c->opts.node);
    else
        status_connected(c->opts.status);
}

static void tc_status_lost(struct tclient *c, const char *reason)
{
    if (c->opts.node)
        status_node_lost(c->opts.node, reason);
    else
        status_lost(c->opts.status, reason);
}

/* Ends the current attempt, then reports it. */
static void tc_end(struct tclient *c, enum tclient_end how, const char *reason)
{
    bool healthy = c->authed && tc_elapsed(&c->authed_at) >= TC_HEALTHY_SECONDS;
    char note[80] = "";
    unsigned long held = 0;
    bool say = how == TCLIENT_LOST &&
               (!c->opts.end_log || log_limit_take_burst(c->opts.end_log, time(NULL),
                                                         TC_LOG_PERIOD, TC_END_LINES, &held));
    tc_held_note(note, sizeof(note), held);
    if (say && c->authed && c->opts.node)
        log_warn(TC_MOD, "disconnected from node %s:%u: %s%s", c->opts.host,
                 (unsigned)c->opts.port, reason, note);
    else if (say && c->authed)
        log_warn(TC_MOD, "disconnected from server: %s%s", reason, note);
    else if (say)
        log_warn(TC_MOD, "cannot connect to %s:%u: %s%s", c->opts.host,
                 (unsigned)c->opts.port, reason, note);
    if (how == TCLIENT_LOST)
        tc_status_lost(c, reason);
    tc_close_session(c);
    if (c->on_end)
        c->on_end(how, healthy, c->arg);
}

static void tc_send_hello(struct tclient *c)
{
    /* notices: the server may tell us when our mappings change; optimistic: it may send a
     * stream's first Data before our ConnectResponse, held until the dial completes
     * (docs/PROTOCOL.md). */
    json_t *j = json_pack("{s:s, s:s, s:s, s:b, s:b}", "name", c->opts.name, "token",
                          c->opts.token, "version", PORTMUX_VERSION, "notices", 1,
                          "optimistic", 1);
    mux_session_set_early_data(c->mux);
    mux_conn_send_json(c->conn, FRAME_HELLO, j);
}

static void tc_authed(struct tclient *c)
{
    c->authed = c->ever_authed = true;
    clock_gettime(CLOCK_MONOTONIC, &c->authed_at);
    mux_session_set_open(c->mux);
    event_del(c->deadline);
    mux_conn_start_keepalive(c->conn, c->opts.heartbeat_interval, c->opts.heartbeat_timeout);
    log_info(TC_MOD, "connected to %s:%u as \"%s\"%s", c->opts.host, (unsigned)c->opts.port,
             c->opts.name, c->opts.ssl ? " (TLS)" : "");
    tc_status_connected(c);
}

/* The mappings a HelloResponse announces, for the status. Informational: an entry that
 * does not look right is skipped; an older server sends none. */
static void tc_show_mappings(struct tclient *c, json_t *list);

static void tc_read_mappings(struct tclient *c, json_t *root)
{
    json_t *list = json_object_get(root, "mappings");
    if (!c->opts.status || c->opts.node)
        return;
    const char *source = NULL;
    json_int_t takeovers = 0, refused = 0;
    if (json_unpack(json_object_get(root, "client"), "{s:s, s:I, s:I}", "source", &source,
                    "takeovers", &takeovers, "refused", &refused) != 0)
        source = NULL;
    status_set_client(c->opts.status, source, (long long)takeovers, (long long)refused);
    status_mappings_clear(c->opts.status);
    tc_show_mappings(c, list);
}

/* Announces the listed mappings in the status (entries that look wrong are skipped). */
static void tc_show_mappings(struct tclient *c, json_t *list)
{
    json_t *m;
    size_t i;
    if (!json_is_array(list))
        return;
    json_array_foreach(list, i, m) {
        json_int_t port = 0;
        const char *target = NULL;
        if (json_unpack(m, "{s:I, s:s}", "port", &port, "target", &target) != 0 || port < 1 ||
            port > 65535 || strlen(target) > STATUS_TARGET_MAX)
            continue;
        status_mapping_add(c->opts.status, (int)port, target);
    }
}

/* The "nodes" of a HelloResponse or Notice to the node sessions (SPEC §7). No list (a
 * server outside a cluster, or a node that does not know the others yet) leaves the node
 * sessions as they are. */
static void tc_pass_nodes(struct tclient *c, json_t *msg)
{
    json_t *nodes = json_object_get(msg, "nodes");
    if (c->opts.on_nodes && json_is_array(nodes))
        c->opts.on_nodes(nodes, c->opts.nodes_arg);
}

/* A Notice (only after our Hello asked for them). An event this client does not know is
 * ignored: a newer server may send more kinds. */
static int tc_on_notice(struct tclient *c, const char *json, size_t len)
{
    json_error_t jerr;
    const char *event = NULL;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root || json_unpack(root, "{s:s}", "event", &event) != 0) {
        json_decref(root);
        return -1;
    }
    if (strcmp(event, "nodes") == 0)
        tc_pass_nodes(c, root);
    if (strcmp(event, "mappings") == 0 && c->opts.status && !c->opts.node) {
        status_mappings_reset(c->opts.status);
        tc_show_mappings(c, json_object_get(root, "mappings"));
        status_mappings_prune(c->opts.status);
    }
    json_decref(root);
    return 0;
}

static int tc_on_json(struct mux_session *mux, uint8_t type, const char *json, size_t len,
                      void *arg)
{
    struct tclient *c = arg;
    json_error_t jerr;
    int ok = 0;
    const char *message = "", *error = "";
    if (type == FRAME_NOTICE)
        return tc_on_notice(c, json, len);
    if (c->authed)
        return -1; /* a second HelloResponse */
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root || json_unpack(root, "{s:b, s?s, s?s}", "ok", &ok, "message", &message,
                             "error", &error) != 0) {
        json_decref(root);
        return -1;
    }
    if (ok) {
        tc_read_mappings(c, root);
        tc_authed(c);
        tc_pass_nodes(c, root);
    } else {
        snprintf(c->refusal, sizeof(c->refusal), "server refused: %s",
                 message[0] ? message : "(no reason given)");
        /* main prints it to stderr as it is, and the status block shows it: the server's
         * text must not carry a terminal escape (C0, DEL, or UTF-8's C1 controls) or a
         * line of its own. Printable ASCII only, as the status block's other fields. */
        for (char *p = c->refusal; *p; p++)
            if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f)
                *p = '?';
        /* Our own previous session may still look alive to the server: retry then. */
        if (c->ever_authed && strcmp(error, "already_connected") == 0) {
            c->refusal[0] = '\0';
            c->already_connected = true;
        } else if (strcmp(error, "rate_limited") == 0) {
            /* This address's Hellos are blocked for a while, perhaps by someone else's
             * failures behind the same NAT: giving up would leave a supervised client
             * stopped for good (its unit does not restart exit 2). Backoff and retry. */
            log_warn("client", "%.200s; trying again later", c->refusal);
            c->refusal[0] = '\0';
            c->rate_limited = true;
        }
    }
    json_decref(root);
    return ok ? 0 : MUX_STOPPED;
}

static const struct mux_session_callbacks tc_mux_cb = {
    .on_connect_request = tc_on_connect_request,
    .on_json = tc_on_json,
};

/* The mux stopped reading: a protocol error, or the HelloResponse said no. */
static void tc_on_stop(struct mux_conn *conn, int rc, void *arg)
{
    struct tclient *c = arg;
    if (rc < 0) {
        char reason[200];
        snprintf(reason, sizeof(reason), "protocol error: %s", mux_session_error(c->mux));
        tc_end(c, TCLIENT_LOST, reason);
    } else if (c->refusal[0]) {
        tc_end(c, TCLIENT_REFUSED, c->refusal);
    } else if (c->rate_limited) {
        tc_end(c, TCLIENT_LOST, "Hellos from this address are blocked for a while");
    } else {
        tc_end(c, TCLIENT_LOST, "server says this client is still connected");
    }
}

static void tc_on_input(struct mux_conn *conn, void *arg)
{
    struct tclient *c = arg;
    if (c->opts.node)
        status_node_set_rtt(c->opts.node, mux_session_rtt_ms(c->mux));
    else
        status_set_rtt(c->opts.status, mux_session_rtt_ms(c->mux));
}

static void tc_on_event(struct mux_conn *conn, short what, void *arg)
{
    struct tclient *c = arg;
    struct bufferevent *bev = mux_conn_bev(conn);
    char reason[300] = "";
    if (what & BEV_EVENT_CONNECTED) {
        c->connected = true;
        bridge_set_nodelay(bufferevent_getfd(bev));
        tc_send_hello(c);
        return;
    }
    bool cert = c->opts.ssl && client_tls_failure(bev, c->ssl, reason, sizeof(reason));
    /* A certificate problem at the first connection is a configuration to fix: refused
     * (exit 2). Once this client has been in, the same failure is anyone on the path (one
     * forged alert, a certificate of their own) or a server's certificate being replaced:
     * taken as a lost connection and retried with backoff, so it cannot stop us for good. */
    if (c->ever_authed)
        cert = false;
    if (!c->ever_authed && !c->authed && !(what & BEV_EVENT_TIMEOUT) &&
        client_tls_cert_requested(c->ssl)) {
        snprintf(c->refusal, sizeof(c->refusal),
                 "the server wants a client certificate (mutual TLS): give --cert FILE "
                 "--key FILE%s%s", reason[0] ? "; TLS: " : "", reason);
        tc_end(c, TCLIENT_REFUSED, c->refusal);
        return;
    }
    if (reason[0] && c->opts.ssl && !c->authed) {
        snprintf(c->refusal, sizeof(c->refusal), "TLS handshake failed: %s", reason);
        tc_end(c, cert ? TCLIENT_REFUSED : TCLIENT_LOST, c->refusal);
        return;
    }
    int dns_err = bufferevent_socket_get_dns_error(tls_bev_socket(bev));
    if (what & BEV_EVENT_TIMEOUT)
        snprintf(reason, sizeof(reason), "server %s for %d s",
                 what & BEV_EVENT_WRITING ? "not reading" : "silent", c->opts.heartbeat_timeout);
    else if (dns_err)
        snprintf(reason, sizeof(reason), "cannot resolve: %s", evutil_gai_strerror(dns_err));
    else if (what & BEV_EVENT_EOF)
        snprintf(reason, sizeof(reason), "connection closed by server");
    else if (!reason[0])
        snprintf(reason, sizeof(reason), "%s",
                 evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
    tc_end(c, TCLIENT_LOST, reason);
}

static void tc_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tclient *c = arg;
    char reason[96];
    snprintf(reason, sizeof(reason), "no answer within %d s", c->opts.connect_timeout);
    tc_end(c, TCLIENT_LOST, reason);
}

static const struct mux_conn_hooks tc_conn_hooks = {
    .on_stop = tc_on_stop,
    .on_input = tc_on_input,
    .on_event = tc_on_event,
};

int tclient_connect(struct tclient *c)
{
    if (c->conn)
        return -1;
    c->refusal[0] = '\0';
    c->already_connected = false;
    c->rate_limited = false;
    SSL *ssl = NULL;
    if (c->opts.ssl && !(ssl = client_tls_ssl_new(c->opts.ssl, c->opts.server_name)))
        return -1;
    c->conn = mux_conn_new(c->base, -1, ssl, BUFFEREVENT_SSL_CONNECTING, TC_BEV_OPTS,
                           MUX_ROLE_CLIENT, &tc_mux_cb, &tc_conn_hooks, c);
    if (!c->conn)
        return -1;
    c->ssl = ssl;
    c->mux = mux_conn_mux(c->conn);
    mux_session_set_buffer_limit(c->mux, c->opts.session_buffer_limit);
    struct timeval tv = {c->opts.connect_timeout, 0};
    evtimer_add(c->deadline, &tv);
    log_debug(TC_MOD, "connecting to %s:%u", c->opts.host, (unsigned)c->opts.port);
    tc_status_connecting(c);
    if (mux_conn_connect_hostname(c->conn, c->dns, c->opts.host, c->opts.port) != 0)
        goto fail;
    return 0;
fail:
    tc_close_session(c);
    return -1;
}

struct tclient *tclient_new(struct event_base *base, struct evdns_base *dns,
                            const struct tclient_opts *opts, tclient_end_cb cb, void *arg)
{
    struct tclient *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->base = base;
    c->dns = dns;
    c->opts = *opts;
    c->on_end = cb;
    c->arg = arg;
    TAILQ_INIT(&c->dials);
    c->deadline = evtimer_new(base, tc_deadline_cb, c);
    if (!c->deadline) {
        tclient_free(c);
        return NULL;
    }
    return c;
}

const char *tclient_refusal(const struct tclient *c) { return c->refusal; }

void tclient_free(struct tclient *c)
{
    if (!c)
        return;
    if (c->conn)
        tc_close_session(c);
    if (c->deadline)
        event_free(c->deadline);
    free(c);
}

bool tclient_already_connected(const struct tclient *c) { return c->already_connected; }

bool tclient_up(const struct tclient *c) { return c->conn && c->authed; }

/* Extra cluster node sessions of portmux-client (see nodes.h). */
#include "nodes.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <time.h>

#include <event2/event.h>
#include <jansson.h>

#include "allow.h"
#include "log.h"
#include "log_limit.h"
#include "netaddr.h"
#include "status.h"
#include "tunnel_client.h"

#define NS_MOD "client"
/* Node sessions at most: a list is the server's to send, our descriptors are ours. */
#define NS_NODES_MAX STATUS_NODES_MAX
#define NS_STR(x) #x
#define NS_XSTR(x) NS_STR(x)
#define NS_NODES_MAX_TEXT NS_XSTR(STATUS_NODES_MAX)
#define NS_ADDR_MAX 300
#define NS_REFUSED_LOG_SECONDS 10
/* Join and leave lines written per NS_REFUSED_LOG_SECONDS: a full list coming and going
 * twice, then only a count. */
#define NS_CHURN_LINES (4 * NS_NODES_MAX)
#define NS_BACKOFF_CAP_SECONDS 30.0
/* Node connection attempts, new nodes' and retries together: a full list at once, then
 * NS_NODES_MAX per NS_CONNECTS_PERIOD seconds. A list that keeps changing (the server's,
 * or any node's, doing) made the client connect, and send its token, 3,000 times a second
 * to whatever the list named. */
#define NS_CONNECTS_PERIOD 10.0
/* "reconnecting in" lines per NS_REFUSED_LOG_SECONDS, all nodes together. */
#define NS_RETRY_LINES 8

struct ns_node {
    TAILQ_ENTRY(ns_node) link;
    struct nodeset *ns;
    char addr[NS_ADDR_MAX];      /* as listed: "host:port" or "[v6]:port" */
    char host[256];
    uint16_t port;
    struct tclient *tc;
    struct status_node *row;
    struct event *retry;
    int attempt;                 /* consecutive failed attempts */
    bool gone;                   /* its session ended and it is no longer listed */
};

struct nodeset {
    struct event_base *base;
    struct evdns_base *dns;
    struct tclient_opts opts;
    const char *server_name;
    bool no_reconnect;
    char self[NS_ADDR_MAX];      /* the node the --server session reached ("" = unknown) */
    json_t *listed;              /* the last list (array of strings); NULL = none yet */
    bool pending;                /* listed changed since the last apply */
    struct event *apply;
    void (*on_all_down)(void *arg);
    void *all_down_arg;
    TAILQ_HEAD(, ns_node) nodes;
    size_t nnodes;
    struct log_limit refused_log; /* "not in --allow-nodes": lists come as often as the
                                   * server sends them */
    struct log_limit list_log;    /* addresses skipped as malformed, and the same bound */
    time_t churn_at;              /* the window of ns_churn_log */
    unsigned churn_lines;
    unsigned long churn_held;
    double connect_tokens;        /* ns_connect_token's bucket */
    double tokens_at;             /* monotonic seconds of its last refill; 0 = full */
    struct log_limit end_log;     /* the node sessions' end lines (tclient_opts.end_log) */
    struct log_limit retry_log;   /* "reconnecting in", and refusals */
};

/* A list that keeps changing (the server's doing) could write a join and a leave line per
 * node per Notice: the first NS_CHURN_LINES of each window are written, the rest counted
 * and summed up when the next window opens. */
static void ns_churn_log(struct nodeset *ns, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void ns_churn_log(struct nodeset *ns, const char *fmt, ...)
{
    time_t now = time(NULL);
    if (now < ns->churn_at || now - ns->churn_at >= NS_REFUSED_LOG_SECONDS) {
        if (ns->churn_held)
            log_warn(NS_MOD, "node list: %lu join and leave lines not logged: the server "
                             "changed the list that often", ns->churn_held);
        ns->churn_at = now;
        ns->churn_lines = 0;
        ns->churn_held = 0;
    }
    if (ns->churn_lines >= NS_CHURN_LINES) {
        ns->churn_held++;
        return;
    }
    ns->churn_lines++;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    log_info(NS_MOD, "%s", line);
}

/* A malformed entry: one line per NS_REFUSED_LOG_SECONDS, with the count of the rest. */
static void ns_list_skip(struct nodeset *ns, const char *why)
{
    unsigned long held;
    if (log_limit_take(&ns->list_log, time(NULL), NS_REFUSED_LOG_SECONDS, &held))
        log_warn(NS_MOD, "node list: skipping %s (%lu more skipped in the last %d s)", why,
                 held, NS_REFUSED_LOG_SECONDS);
}

static bool ns_listed(const struct nodeset *ns, const char *addr)
{
    size_t i;
    json_t *v;
    if (strcmp(addr, ns->self) == 0)
        return false;
    json_array_foreach(ns->listed, i, v) {
        if (json_is_string(v) && strcmp(json_string_value(v), addr) == 0)
            return true;
    }
    return false;
}

static void ns_node_free(struct ns_node *n)
{
    struct nodeset *ns = n->ns;
    TAILQ_REMOVE(&ns->nodes, n, link);
    ns->nnodes--;
    tclient_free(n->tc);
    if (n->retry)
        event_free(n->retry);
    status_node_remove(ns->opts.status, n->row);
    free(n);
}

/* 1, 2, 4 ... 30 s, each +-20 %, as main.c's reconnect of the --server session. */
static double ns_backoff(int attempt)
{
    double base = attempt >= 6 ? NS_BACKOFF_CAP_SECONDS : (double)(1 << (attempt - 1));
    double d = base * (0.8 + 0.4 * ((double)random() / (double)RAND_MAX));
    return d > NS_BACKOFF_CAP_SECONDS ? NS_BACKOFF_CAP_SECONDS : d;
}

/* " (N more ... held back)" after a bounded node line, or "". */
static const char *ns_held_note(char *buf, size_t len, unsigned long held)
{
    if (!held)
        return "";
    snprintf(buf, len, " (%lu more such lines held back in the last %d s)", held,
             NS_REFUSED_LOG_SECONDS);
    return buf;
}

static struct timeval ns_timeval(double d)
{
    struct timeval tv = {(time_t)d, (suseconds_t)((d - (double)(time_t)d) * 1e6)};
    return tv;
}

static void ns_schedule_retry(struct ns_node *n)
{
    n->attempt++;
    double d = ns_backoff(n->attempt);
    struct timeval tv = ns_timeval(d);
    char note[80];
    unsigned long held;
    if (log_limit_take_burst(&n->ns->retry_log, time(NULL), NS_REFUSED_LOG_SECONDS,
                             NS_RETRY_LINES, &held))
        log_info(NS_MOD, "node %s: reconnecting in %.1f s (attempt %d)%s", n->addr, d,
                 n->attempt, ns_held_note(note, sizeof(note), held));
    status_node_retry(n->row, d, n->attempt);
    evtimer_add(n->retry, &tv);
}

/* Takes one attempt from the bucket; false with *wait the seconds until one is there. */
static bool ns_connect_token(struct nodeset *ns, double *wait)
{
    const double burst = NS_NODES_MAX, rate = NS_NODES_MAX / NS_CONNECTS_PERIOD;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double now = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    if (ns->tokens_at == 0)
        ns->connect_tokens = burst;
    else if (now > ns->tokens_at)
        ns->connect_tokens += (now - ns->tokens_at) * rate;
    if (ns->connect_tokens > burst)
        ns->connect_tokens = burst;
    ns->tokens_at = now;
    if (ns->connect_tokens >= 1) {
        ns->connect_tokens -= 1;
        return true;
    }
    *wait = (1 - ns->connect_tokens) / rate;
    return false;
}

/* Connects n now, or when the bucket has an attempt for it (its retry timer again). */
static void ns_connect(struct ns_node *n)
{
    double wait;
    if (!ns_connect_token(n->ns, &wait)) {
        struct timeval tv = ns_timeval(wait);
        evtimer_add(n->retry, &tv);
        return;
    }
    if (tclient_connect(n->tc) != 0) {
        log_error(NS_MOD, "node %s: cannot start a connection", n->addr);
        if (!n->ns->no_reconnect)
            ns_schedule_retry(n);
    }
}

static void ns_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    ns_connect(arg);
}

/* A node session ended (its tclient is idle). Called from inside the tclient: the node
 * is only marked here and freed by the next apply. */
static void ns_on_end(enum tclient_end how, bool healthy, void *arg)
{
    struct ns_node *n = arg;
    struct nodeset *ns = n->ns;
    if (how == TCLIENT_REFUSED) {
        char note[80];
        unsigned long held;
        if (log_limit_take_burst(&ns->retry_log, time(NULL), NS_REFUSED_LOG_SECONDS,
                                 NS_RETRY_LINES, &held))
            log_warn(NS_MOD, "node %s: %s%s", n->addr, tclient_refusal(n->tc),
                     ns_held_note(note, sizeof(note), held));
        status_node_lost(n->row, tclient_refusal(n->tc));
    }
    if (ns->on_all_down && nodeset_up(ns) == 0)
        ns->on_all_down(ns->all_down_arg);
    if (!ns_listed(ns, n->addr)) {
        n->gone = true;
        event_active(ns->apply, EV_TIMEOUT, 0);
        return;
    }
    if (ns->no_reconnect)
        return;
    if (healthy)
        n->attempt = 0;
    ns_schedule_retry(n);
}

static void ns_on_nodes_from_node(json_t *nodes, void *arg)
{
    struct ns_node *n = arg;
    nodeset_update(n->ns, nodes, false);
}

static struct ns_node *ns_node_new(struct nodeset *ns, const char *addr, const char *host,
                                   uint16_t port)
{
    struct ns_node *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->ns = ns;
    snprintf(n->addr, sizeof(n->addr), "%s", addr);
    snprintf(n->host, sizeof(n->host), "%s", host);
    n->port = port;
    TAILQ_INSERT_TAIL(&ns->nodes, n, link);
    ns->nnodes++;
    n->row = status_node_add(ns->opts.status, addr);
    struct tclient_opts o = ns->opts;
    o.host = n->host;
    o.port = port;
    o.server_name = ns->server_name ? ns->server_name : n->host;
    o.node = n->row;
    o.on_nodes = ns_on_nodes_from_node;
    o.nodes_arg = n;
    o.end_log = &ns->end_log;
    n->tc = tclient_new(ns->base, ns->dns, &o, ns_on_end, n);
    n->retry = evtimer_new(ns->base, ns_retry_cb, n);
    if (!n->tc || !n->retry) {
        ns_node_free(n);
        return NULL;
    }
    return n;
}

static struct ns_node *ns_find(struct nodeset *ns, const char *addr)
{
    struct ns_node *n;
    TAILQ_FOREACH(n, &ns->nodes, link) {
        if (strcmp(n->addr, addr) == 0)
            return n;
    }
    return NULL;
}

/* Drops the nodes no longer listed (or gone), and connects the listed ones not yet known. */
/* A listed node is connected only when --allow-nodes, or without it --allow, permits it:
 * the list is the server's word, and --allow bounds what the server can make this client
 * connect to (a node session sends the token in its Hello). */
static bool ns_node_allowed(const struct nodeset *ns, const char *host, uint16_t port)
{
    const struct allow_list *rules = ns->opts.allow_nodes;
    if (!rules || rules->len == 0)
        rules = ns->opts.allow;
    return !rules || rules->len == 0 || allow_list_match(rules, host, port);
}

static void ns_apply(evutil_socket_t fd, short what, void *arg)
{
    struct nodeset *ns = arg;
    struct ns_node *n, *next;
    for (n = TAILQ_FIRST(&ns->nodes); n; n = next) {
        next = TAILQ_NEXT(n, link);
        if (n->gone || !ns_listed(ns, n->addr)) {
            ns_churn_log(ns, "node %s left the cluster: session closed", n->addr);
            ns_node_free(n);
        }
    }
    if (!ns->pending)
        return;
    ns->pending = false;
    size_t i;
    json_t *v;
    json_array_foreach(ns->listed, i, v) {
        char host[256];
        uint16_t port;
        const char *addr = json_string_value(v);
        if (!addr || strlen(addr) >= NS_ADDR_MAX || strcmp(addr, ns->self) == 0 ||
            ns_find(ns, addr))
            continue;
        /* Logged and shown: nothing but printable ASCII from the server. */
        for (const char *p = addr; *p && addr; p++)
            if (*p < 0x21 || *p > 0x7e)
                addr = NULL;
        if (!addr) {
            ns_list_skip(ns, "an address with unprintable bytes");
            continue;
        }
        if (netaddr_split_host_port(addr, host, sizeof(host), &port) != 0) {
            ns_list_skip(ns, "an address that is not HOST:PORT");
            continue;
        }
        if (!ns_node_allowed(ns, host, port)) {
            unsigned long held;
            bool own = ns->opts.allow_nodes && ns->opts.allow_nodes->len;
            if (log_limit_take(&ns->refused_log, time(NULL), NS_REFUSED_LOG_SECONDS, &held))
                log_warn(NS_MOD, "node %s not connected: not in %s (%lu more skipped in the "
                                 "last %d s)",
                         addr, own ? "--allow-nodes" : "--allow (list the cluster's nodes "
                                                       "with --allow-nodes)",
                         held, NS_REFUSED_LOG_SECONDS);
            continue;
        }
        if (ns->nnodes >= NS_NODES_MAX) {
            ns_list_skip(ns, "the nodes beyond the first " NS_NODES_MAX_TEXT
                             " others: they are not connected");
            break;
        }
        n = ns_node_new(ns, addr, host, port);
        if (!n) {
            log_error(NS_MOD, "node %s: out of memory", addr);
            continue;
        }
        ns_churn_log(ns, "node %s joined the cluster: connecting", addr);
        ns_connect(n);
    }
}

void nodeset_primary_lost(struct nodeset *ns)
{
    if (!ns || !ns->self[0])
        return;
    log_debug(NS_MOD, "node %s: the --server session ended; a node session takes over "
                      "while it is listed", ns->self);
    ns->self[0] = '\0';
    ns->pending = true;
    event_active(ns->apply, EV_TIMEOUT, 0);
}

size_t nodeset_up(const struct nodeset *ns)
{
    size_t up = 0;
    const struct ns_node *n;
    if (!ns)
        return 0;
    TAILQ_FOREACH(n, &ns->nodes, link) {
        if (tclient_up(n->tc))
            up++;
    }
    return up;
}

void nodeset_set_on_all_down(struct nodeset *ns, void (*fn)(void *arg), void *arg)
{
    if (!ns)
        return;
    ns->on_all_down = fn;
    ns->all_down_arg = arg;
}

void nodeset_update(struct nodeset *ns, json_t *nodes, bool primary)
{
    if (!ns)
        return;
    json_t *list = json_is_array(nodes) ? json_deep_copy(nodes) : json_array();
    if (!list)
        return;
    if (primary) {
        const char *first = json_string_value(json_array_get(list, 0));
        snprintf(ns->self, sizeof(ns->self), "%s",
                 first && strlen(first) < sizeof(ns->self) ? first : "");
    }
    json_decref(ns->listed);
    ns->listed = list;
    ns->pending = true;
    event_active(ns->apply, EV_TIMEOUT, 0);
}

struct nodeset *nodeset_new(struct event_base *base, struct evdns_base *dns,
                            const struct tclient_opts *base_opts, const char *server_name,
                            bool no_reconnect)
{
    struct nodeset *ns = calloc(1, sizeof(*ns));
    if (!ns)
        return NULL;
    ns->base = base;
    ns->dns = dns;
    ns->opts = *base_opts;
    ns->opts.on_nodes = NULL;
    ns->opts.nodes_arg = NULL;
    ns->server_name = server_name;
    ns->no_reconnect = no_reconnect;
    TAILQ_INIT(&ns->nodes);
    ns->apply = event_new(base, -1, 0, ns_apply, ns);
    if (!ns->apply) {
        free(ns);
        return NULL;
    }
    return ns;
}

void nodeset_free(struct nodeset *ns)
{
    if (!ns)
        return;
    while (!TAILQ_EMPTY(&ns->nodes))
        ns_node_free(TAILQ_FIRST(&ns->nodes));
    event_free(ns->apply);
    json_decref(ns->listed);
    free(ns);
}

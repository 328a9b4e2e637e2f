/* Propagation between nodes (SPEC §7): a second PostgreSQL connection, entirely
 * asynchronous on the event loop, that LISTENs on portmux_mappings and reads the whole
 * mappings table after every notification, every CSYNC_RESYNC_S seconds and after every
 * (re)connect, then brings the live registry in line with it.
 *
 * Nothing here blocks: the connect is driven by PQconnectPoll from socket events, the
 * reads are PQsendQuery with their results taken as the socket becomes readable. A
 * stopped database only means no events; a lost connection is reopened with backoff. */
#include "cluster_sync.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <openssl/rand.h>

#include "clients.h"
#include "config.h"
#include "log.h"
#include "mapping.h"
#include "pg_dial.h"
#include "server.h"
#include "store.h"
#include "store_pg.h"
#include "tunnel_server.h"

#define CSYNC_RESYNC_S 30
#define CSYNC_BACKOFF_MAX_S 30
/* Both shared tables in one query (two results): a notice about either reads both. */
#define CSYNC_SELECT "SELECT " PG_MAP_COLS " FROM mappings ORDER BY port; " \
                     "SELECT " PG_CLIENT_READ_COLS " FROM clients ORDER BY name"
#define CSYNC_HEARTBEAT_S 5
/* A query unanswered this long: the database is taken as stalled (the store's gate). */
#define CSYNC_STALL_MS 1000
/* Given up and reconnected: a connect unanswered this long, a query unanswered this long. */
#define CSYNC_CONNECT_MS 10000
#define CSYNC_SILENT_MS 20000
#define CSYNC_GONE_S 15
#define CSYNC_NODES_MAX 256   /* rows read from nodes; more is not a cluster we serve */
/* Rows of nodes silent this long are deleted (any node's heartbeat does it): every name
 * ever used keeps a row otherwise, and host names change with each container. */
#define CSYNC_FORGET_S 86400
#define CSYNC_CLASH_LOG_S 60  /* how often a taken node name is said again */
#define CSYNC_NAME_MAX 64

struct csync_node {
    char name[CSYNC_NAME_MAX + 1];
    char advertise[256];
    int64_t heartbeat_at;    /* database clock */
    int64_t clients;
    int64_t mappings_listening;
    bool alive;
    json_t *statuses;        /* {"<port>": "<status>"}, the node's own view; may be NULL */
};

enum csync_query { CSYNC_Q_NONE, CSYNC_Q_MAPPINGS, CSYNC_Q_NODES };

enum csync_state { CSYNC_DOWN, CSYNC_CONNECTING, CSYNC_READY };

struct cluster_sync {
    struct server *srv;
    char *conninfo;
    struct pg_dial *dial;    /* resolving the database's host names (pg_dial.h) */
    PGconn *conn;
    enum csync_state state;
    struct event *sock_ev;   /* the connection's socket: connect steps, then reads */
    struct event *flush_ev;  /* writable, while a query is not fully sent */
    struct event *tick;      /* resync every CSYNC_RESYNC_S s */
    struct event *retry;     /* reconnect after backoff */
    struct event *beat;      /* heartbeat every CSYNC_HEARTBEAT_S s */
    char node_name[CSYNC_NAME_MAX + 1];
    char instance[17];       /* this process, in its row: tells two nodes of one name apart */
    enum csync_query inflight;
    bool want_beat;          /* send the heartbeat once idle */
    struct csync_node *nodes;
    size_t nodes_len;
    int64_t nodes_read_at;   /* database clock of the last nodes read; 0 = never */
    int backoff_s;
    bool busy;               /* a query is in flight */
    bool dirty;              /* read the table again once the current query is done */
    uint64_t sent_writes;    /* store_write_count when the read was sent */
    unsigned char seen[65536 / 8]; /* ports present in the read being applied */
    uint64_t resyncs;        /* reads applied, for the log and tests */
    int64_t sent_at_ms;      /* CLOCK_MONOTONIC of the query in flight */
    int64_t connect_at_ms;   /* CLOCK_MONOTONIC of the connect in progress */
    int tuples_seen;         /* row-returning results of the query in flight so far */
    bool stale;              /* its mappings read was overtaken: skip the clients read too */
    bool passed_over;        /* a read left a port alone for a write in flight */
    bool announce;           /* the LISTEN and first read in flight: log when they are done */
    bool name_taken;         /* the last heartbeat found our name held by another live node */
    int64_t clash_logged_ms; /* CLOCK_MONOTONIC of the last line saying so; 0 = never */
};

static void csync_connect(struct cluster_sync *cs);

static int64_t csync_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The store's gate (store_set_gate): the database answers this connection, or at least
 * has not kept a query waiting for CSYNC_STALL_MS. */
static bool csync_db_ok(void *arg)
{
    struct cluster_sync *cs = arg;
    if (cs->state == CSYNC_CONNECTING)
        return true; /* not known yet: the store tries with its own deadline */
    if (cs->state == CSYNC_DOWN)
        return false;
    return !cs->busy || csync_now_ms() - cs->sent_at_ms < CSYNC_STALL_MS;
}
static void csync_on_sock(evutil_socket_t fd, short what, void *arg);

/* why: what went wrong, or NULL for the connection's own error message. */
static void csync_log_conn_error(struct cluster_sync *cs, const char *what, const char *why)
{
    char msg[256];
    snprintf(msg, sizeof(msg), "%s",
             why ? why : cs->conn ? PQerrorMessage(cs->conn) : "out of memory");
    for (char *p = msg; *p; p++)
        if (*p == '\n' || *p == '\r' || *p == '\t')
            *p = ' ';
    log_warn("cluster", "%s%s%s", what, msg[0] ? ": " : "", msg);
}

static void csync_free_events(struct cluster_sync *cs)
{
    if (cs->sock_ev)
        event_free(cs->sock_ev);
    if (cs->flush_ev)
        event_free(cs->flush_ev);
    cs->sock_ev = cs->flush_ev = NULL;
}

/* Drops the connection and tries again after the backoff (1 s doubling to 30 s). */
static void csync_lost_why(struct cluster_sync *cs, const char *what, const char *why)
{
    csync_log_conn_error(cs, what, why);
    pg_dial_cancel(cs->dial);
    cs->dial = NULL;
    csync_free_events(cs);
    if (cs->conn)
        PQfinish(cs->conn);
    cs->conn = NULL;
    cs->state = CSYNC_DOWN;
    cs->busy = false;
    cs->inflight = CSYNC_Q_NONE;
    cs->backoff_s = cs->backoff_s ? cs->backoff_s * 2 : 1;
    if (cs->backoff_s > CSYNC_BACKOFF_MAX_S)
        cs->backoff_s = CSYNC_BACKOFF_MAX_S;
    struct timeval tv = {cs->backoff_s, 0};
    evtimer_add(cs->retry, &tv);
}

static void csync_lost(struct cluster_sync *cs, const char *what)
{
    csync_lost_why(cs, what, NULL);
}

static void csync_flush(struct cluster_sync *cs)
{
    int f = PQflush(cs->conn);
    if (f < 0) {
        csync_lost(cs, "sending to the database");
        return;
    }
    if (f == 1)
        event_add(cs->flush_ev, NULL);
}

static void csync_on_flush(evutil_socket_t fd, short what, void *arg)
{
    struct cluster_sync *cs = arg;
    /* PQflush may need to read first (the server talking back while we send). */
    if (!PQconsumeInput(cs->conn)) {
        csync_lost(cs, "reading from the database");
        return;
    }
    csync_flush(cs);
}

/* Sends sql (one query at a time on this connection). */
static void csync_send(struct cluster_sync *cs, const char *sql, enum csync_query kind)
{
    if (kind == CSYNC_Q_MAPPINGS) {
        cs->dirty = false;
        cs->sent_writes = store_write_count(cs->srv->store);
    }
    if (!PQsendQuery(cs->conn, sql)) {
        csync_lost(cs, "querying the database");
        return;
    }
    cs->busy = true;
    cs->inflight = kind;
    cs->tuples_seen = 0;
    cs->stale = false;
    cs->sent_at_ms = csync_now_ms();
    csync_flush(cs);
}

static char *csync_heartbeat_sql(struct cluster_sync *cs);

/* Once the connection is idle: the heartbeat first (it is due on time), then a read of
 * the mappings when one is wanted. */
static void csync_kick(struct cluster_sync *cs)
{
    if (cs->state != CSYNC_READY || cs->busy)
        return;
    if (cs->want_beat) {
        char *sql = csync_heartbeat_sql(cs);
        if (sql) {
            cs->want_beat = false;
            csync_send(cs, sql, CSYNC_Q_NODES);
            free(sql);
            return;
        }
    }
    if (cs->dirty)
        csync_send(cs, CSYNC_SELECT, CSYNC_Q_MAPPINGS);
}

static void csync_mark(struct cluster_sync *cs, int port)
{
    cs->seen[port >> 3] |= (unsigned char)(1u << (port & 7));
}

static bool csync_marked(const struct cluster_sync *cs, int port)
{
    return (cs->seen[port >> 3] >> (port & 7)) & 1u;
}

/* The whole table: every row applied, every live mapping without a row dropped. A read
 * that a local write may have overtaken (sent before it) is not applied but redone, or
 * it could drop a mapping this node has just created. */
static void csync_apply(struct cluster_sync *cs, PGresult *res)
{
    if (store_write_count(cs->srv->store) != cs->sent_writes) {
        cs->dirty = true;
        cs->stale = true;
        return;
    }
    struct mapping_registry *reg = cs->srv->mappings;
    struct mapping_record *rec = malloc(sizeof(*rec));
    if (!rec) {
        cs->dirty = true;
        return;
    }
    memset(cs->seen, 0, sizeof(cs->seen));
    int changed = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        store_pg_read_mapping(res, i, rec);
        if (rec->port < 1 || rec->port > 65535)
            continue;
        csync_mark(cs, rec->port);
        cs->passed_over = cs->passed_over || mapping_registry_writing(reg, rec->port);
        changed += mapping_registry_apply(reg, rec);
    }
    free(rec);
    struct mapping *m = mapping_registry_first(reg);
    while (m) {
        struct mapping *next = mapping_registry_next(m);
        if (!csync_marked(cs, m->rec.port)) {
            cs->passed_over = cs->passed_over || mapping_registry_writing(reg, m->rec.port);
            changed += mapping_registry_forget(reg, m->rec.port);
        }
        m = next;
    }
    cs->resyncs++;
    if (changed)
        log_info("cluster", "resync: %d mapping(s) changed by other nodes", changed);
}

static void csync_nodes_apply(struct cluster_sync *cs, PGresult *res);
static void csync_name_check(struct cluster_sync *cs, bool registered);

static void csync_client_gone(const char *name, void *arg)
{
    struct cluster_sync *cs = arg;
    if (cs->srv->tunnel)
        tunnel_server_client_removed(cs->srv->tunnel, name);
}

/* The clients table, read right after the mappings in the same query (same rule: a
 * read a local write may have overtaken is not applied). */
static void csync_clients_apply(struct cluster_sync *cs, PGresult *res)
{
    if (cs->stale || store_write_count(cs->srv->store) != cs->sent_writes || !cs->srv->clients) {
        cs->dirty = cs->dirty || cs->stale ||
                    store_write_count(cs->srv->store) != cs->sent_writes;
        return;
    }
    struct client_record rec;
    int changed = 0;
    clients_sync_begin(cs->srv->clients);
    for (int i = 0; i < PQntuples(res); i++) {
        store_pg_read_client(res, i, &rec);
        changed += clients_sync_row(cs->srv->clients, &rec, csync_client_gone, cs);
    }
    changed += clients_sync_end(cs->srv->clients, csync_client_gone, cs);
    if (changed)
        log_info("cluster", "resync: %d tunnel client(s) changed by other nodes", changed);
}

static void csync_on_result(struct cluster_sync *cs, PGresult *r)
{
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_TUPLES_OK && cs->inflight == CSYNC_Q_NODES) {
        if (cs->tuples_seen++ == 0) /* the upsert's RETURNING: no row, it was refused */
            csync_name_check(cs, PQntuples(r) > 0);
        else
            csync_nodes_apply(cs, r);
    } else if (st == PGRES_TUPLES_OK) {
        if (cs->tuples_seen++ == 0)
            csync_apply(cs, r);
        else
            csync_clients_apply(cs, r);
    } else if (st != PGRES_COMMAND_OK) {
        char msg[256];
        snprintf(msg, sizeof(msg), "%s", PQresultErrorMessage(r));
        msg[strcspn(msg, "\r\n")] = '\0';
        log_warn("cluster", "%s: %s",
                 cs->inflight == CSYNC_Q_NODES ? "heartbeat" : "reading mappings", msg);
        if (cs->inflight == CSYNC_Q_MAPPINGS)
            cs->dirty = true;
        cs->announce = false; /* not listening after all: the warning says why */
    }
}

static void csync_on_read(struct cluster_sync *cs)
{
    if (!PQconsumeInput(cs->conn)) {
        csync_lost(cs, "reading from the database");
        return;
    }
    while (cs->busy && !PQisBusy(cs->conn)) {
        PGresult *r = PQgetResult(cs->conn);
        if (!r) {
            cs->busy = false;
            cs->inflight = CSYNC_Q_NONE;
            if (cs->announce) {
                cs->announce = false;
                log_info("cluster", "listening for changes from other nodes");
            }
            break;
        }
        csync_on_result(cs, r);
        PQclear(r);
    }
    PGnotify *n;
    while ((n = PQnotifies(cs->conn)) != NULL) {
        cs->dirty = true;
        PQfreemem(n);
    }
    csync_kick(cs);
}

/* Connected: listen first, then the full read that heals whatever was missed. */
static void csync_ready(struct cluster_sync *cs)
{
    csync_free_events(cs);
    if (PQsetnonblocking(cs->conn, 1) != 0) {
        csync_lost(cs, "switching to non-blocking");
        return;
    }
    struct event_base *base = cs->srv->base;
    cs->sock_ev = event_new(base, PQsocket(cs->conn), EV_READ | EV_PERSIST, csync_on_sock, cs);
    cs->flush_ev = event_new(base, PQsocket(cs->conn), EV_WRITE, csync_on_flush, cs);
    if (!cs->sock_ev || !cs->flush_ev || event_add(cs->sock_ev, NULL) != 0) {
        csync_lost(cs, "watching the database socket");
        return;
    }
    cs->state = CSYNC_READY;
    cs->backoff_s = 0;
    cs->busy = false;
    /* One Query message runs as one transaction, and a LISTEN takes effect only when its
     * transaction commits: in "LISTEN; SELECT" a change committed after the SELECT's
     * snapshot but before that commit would be in neither the rows read nor the
     * notifications (until the next resync). The COMMIT makes the LISTEN effective
     * before the reads begin; the reads then see all that was committed before. */
    csync_send(cs, "LISTEN portmux_mappings; COMMIT; " CSYNC_SELECT, CSYNC_Q_MAPPINGS);
    cs->announce = true; /* logged once that first read is done: from then on, we listen */
    cs->want_beat = true; /* register at once, after the first read */
}

/* One PQconnectPoll step; waits for the socket state it asks for. */
static void csync_connect_step(struct cluster_sync *cs)
{
    PostgresPollingStatusType st = PQconnectPoll(cs->conn);
    if (st == PGRES_POLLING_OK) {
        csync_ready(cs);
        return;
    }
    if (st == PGRES_POLLING_FAILED) {
        csync_lost(cs, "connecting to the database");
        return;
    }
    csync_free_events(cs);
    short what = st == PGRES_POLLING_READING ? EV_READ : EV_WRITE;
    cs->sock_ev = event_new(cs->srv->base, PQsocket(cs->conn), what, csync_on_sock, cs);
    if (!cs->sock_ev || event_add(cs->sock_ev, NULL) != 0)
        csync_lost(cs, "watching the database socket");
}

static void csync_on_sock(evutil_socket_t fd, short what, void *arg)
{
    struct cluster_sync *cs = arg;
    if (cs->state == CSYNC_CONNECTING)
        csync_connect_step(cs);
    else if (cs->state == CSYNC_READY)
        csync_on_read(cs);
}

static void csync_on_dialled(PGconn *conn, const char *err, void *arg)
{
    struct cluster_sync *cs = arg;
    cs->dial = NULL;
    cs->conn = conn;
    if (!conn) {
        csync_lost_why(cs, "connecting to the database", err);
        return;
    }
    if (PQstatus(conn) == CONNECTION_BAD) {
        csync_lost(cs, "connecting to the database");
        return;
    }
    PQsetNoticeProcessor(cs->conn, store_pg_notice, NULL);
    /* libpq's first step wants the socket writable (the connect in progress). */
    csync_free_events(cs);
    cs->sock_ev = event_new(cs->srv->base, PQsocket(cs->conn), EV_WRITE, csync_on_sock, cs);
    if (!cs->sock_ev || event_add(cs->sock_ev, NULL) != 0)
        csync_lost(cs, "watching the database socket");
}

/* Host names are resolved with evdns first (pg_dial): PQconnectStart's own getaddrinfo
 * would hold the loop for as long as DNS takes. CSYNC_CONNECT_MS covers both steps. */
static void csync_connect(struct cluster_sync *cs)
{
    cs->state = CSYNC_CONNECTING;
    cs->connect_at_ms = csync_now_ms();
    cs->dial = pg_dial_start(cs->srv->base, cs->srv->dns, cs->conninfo, "portmux-sync",
                             csync_on_dialled, cs);
    if (!cs->dial)
        csync_lost_why(cs, "connecting to the database", "out of memory");
}

static void csync_on_retry(evutil_socket_t fd, short what, void *arg)
{
    csync_connect(arg);
}

static void csync_on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct cluster_sync *cs = arg;
    cs->dirty = true;
    csync_kick(cs);
}

static void csync_on_beat(evutil_socket_t fd, short what, void *arg)
{
    struct cluster_sync *cs = arg;
    /* A connection that stopped answering (a half-open TCP connection after a network
     * split, a database stopped for long) is given up and opened afresh, so the node
     * resyncs as soon as the database answers again rather than when TCP gives up. */
    int64_t now = csync_now_ms();
    if (cs->state == CSYNC_CONNECTING && now - cs->connect_at_ms > CSYNC_CONNECT_MS) {
        csync_lost(cs, "connecting to the database: no answer in time");
        return;
    }
    if (cs->state == CSYNC_READY && cs->busy && now - cs->sent_at_ms > CSYNC_SILENT_MS) {
        csync_lost(cs, "the database stopped answering");
        return;
    }
    cs->want_beat = true;
    csync_kick(cs);
}

/* ---- nodes ---- */

static void csync_nodes_clear(struct cluster_sync *cs)
{
    for (size_t i = 0; i < cs->nodes_len; i++)
        json_decref(cs->nodes[i].statuses);
    free(cs->nodes);
    cs->nodes = NULL;
    cs->nodes_len = 0;
}

/* cluster.node_name, or the host name cut to the characters a node name may hold. */
static void csync_default_name(struct cluster_sync *cs)
{
    const char *cfg = cs->srv->cfg->cluster_node_name;
    char host[256] = "";
    if (cfg && *cfg) {
        snprintf(cs->node_name, sizeof(cs->node_name), "%s", cfg);
        return;
    }
    if (gethostname(host, sizeof(host) - 1) != 0 || !host[0])
        snprintf(host, sizeof(host), "node");
    size_t j = 0;
    for (size_t i = 0; host[i] && j < CSYNC_NAME_MAX; i++) {
        char c = host[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        cs->node_name[j++] = ok ? c : '-';
    }
    cs->node_name[j] = '\0';
}

static void csync_new_instance(struct cluster_sync *cs)
{
    unsigned char raw[8];
    if (RAND_bytes(raw, sizeof(raw)) != 1) { /* not a secret: only has to differ */
        snprintf(cs->instance, sizeof(cs->instance), "%08x%08x", (unsigned)getpid(),
                 (unsigned)csync_now_ms());
        return;
    }
    for (size_t i = 0; i < sizeof(raw); i++)
        snprintf(cs->instance + 2 * i, 3, "%02x", raw[i]);
}

static size_t csync_listening(struct cluster_sync *cs)
{
    size_t n = 0;
    for (struct mapping *m = mapping_registry_first(cs->srv->mappings); m;
         m = mapping_registry_next(m))
        n += mapping_status(m) == MAPPING_LISTENING;
    return n;
}

/* This node's view of every mapping, {"<port>": "<status>"}, as text. */
static char *csync_statuses_text(struct cluster_sync *cs)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    for (struct mapping *m = mapping_registry_first(cs->srv->mappings); m;
         m = mapping_registry_next(m)) {
        char key[8];
        snprintf(key, sizeof(key), "%d", m->rec.port);
        json_object_set_new(o, key, json_string(mapping_status_name(mapping_status(m))));
    }
    char *text = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return text;
}

/* The upsert of this node's row and the read of every row, one simple-protocol query
 * (several statements need it); values are escaped by libpq. NULL when out of memory. */
static char *csync_heartbeat_sql(struct cluster_sync *cs)
{
    char *statuses = csync_statuses_text(cs);
    char *name = PQescapeLiteral(cs->conn, cs->node_name, strlen(cs->node_name));
    const char *adv = cs->srv->cfg->cluster_advertise ? cs->srv->cfg->cluster_advertise : "";
    char *advertise = PQescapeLiteral(cs->conn, adv, strlen(adv));
    char *st = statuses ? PQescapeLiteral(cs->conn, statuses, strlen(statuses)) : NULL;
    char *sql = NULL;
    if (name && advertise && st) {
        size_t clients = cs->srv->tunnel ? tunnel_server_client_count(cs->srv->tunnel) : 0;
        /* The row is ours to update when its holder is gone (silent CSYNC_GONE_S), or
         * it is our own (this process's instance, or the same non-empty advertise: this
         * node restarted). Another live node under the same name (two nodes on one host
         * without cluster.node_name) is not overwritten: RETURNING then gives no row and
         * csync_name_check says so. The read puts the live rows first, so rows of nodes
         * gone for good can never push a live one past CSYNC_NODES_MAX. */
        const char *fmt =
            "INSERT INTO nodes (name, advertise, started_at, heartbeat_at, clients, "
            "mappings_listening, statuses, instance) VALUES (%s, %s, %lld, "
            "extract(epoch FROM now())::bigint, %zu, %zu, %s, '%s') "
            "ON CONFLICT (name) DO UPDATE "
            "SET advertise = EXCLUDED.advertise, started_at = EXCLUDED.started_at, "
            "heartbeat_at = EXCLUDED.heartbeat_at, clients = EXCLUDED.clients, "
            "mappings_listening = EXCLUDED.mappings_listening, statuses = EXCLUDED.statuses, "
            "instance = EXCLUDED.instance "
            "WHERE nodes.heartbeat_at < EXCLUDED.heartbeat_at - %d "
            "OR nodes.instance = EXCLUDED.instance "
            "OR (nodes.advertise = EXCLUDED.advertise AND EXCLUDED.advertise <> '') "
            "RETURNING 1; "
            "DELETE FROM nodes WHERE heartbeat_at < extract(epoch FROM now())::bigint - %d; "
            "SELECT * FROM (SELECT name, advertise, heartbeat_at, clients, mappings_listening, "
            "CASE WHEN heartbeat_at >= extract(epoch FROM now())::bigint - %d "
            "THEN statuses END AS statuses, extract(epoch FROM now())::bigint AS now_s FROM nodes "
            "ORDER BY heartbeat_at DESC, name LIMIT %d) AS recent ORDER BY name";
        size_t len = strlen(fmt) + strlen(name) + strlen(advertise) + strlen(st) + 160;
        sql = malloc(len);
        if (sql)
            snprintf(sql, len, fmt, name, advertise, (long long)cs->srv->started_at, clients,
                     csync_listening(cs), st, cs->instance, CSYNC_GONE_S, CSYNC_FORGET_S, CSYNC_GONE_S,
                     CSYNC_NODES_MAX);
    }
    PQfreemem(name);
    PQfreemem(advertise);
    PQfreemem(st);
    free(statuses);
    return sql;
}

static void csync_nodes_apply(struct cluster_sync *cs, PGresult *res)
{
    int n = PQntuples(res);
    struct csync_node *v = n > 0 ? calloc((size_t)n, sizeof(*v)) : NULL;
    if (n > 0 && !v)
        return;
    for (int i = 0; i < n; i++) {
        struct csync_node *d = &v[i];
        snprintf(d->name, sizeof(d->name), "%s", PQgetvalue(res, i, 0));
        snprintf(d->advertise, sizeof(d->advertise), "%s", PQgetvalue(res, i, 1));
        d->heartbeat_at = strtoll(PQgetvalue(res, i, 2), NULL, 10);
        d->clients = strtoll(PQgetvalue(res, i, 3), NULL, 10);
        d->mappings_listening = strtoll(PQgetvalue(res, i, 4), NULL, 10);
        d->statuses = json_loads(PQgetvalue(res, i, 5), 0, NULL);
        int64_t now = strtoll(PQgetvalue(res, i, 6), NULL, 10);
        d->alive = now - d->heartbeat_at <= CSYNC_GONE_S;
        cs->nodes_read_at = now;
    }
    csync_nodes_clear(cs);
    cs->nodes = v;
    cs->nodes_len = (size_t)n;
}

/* Two nodes under one name would take turns in one row, each listing only itself, and
 * tunnel clients would never learn of the other: the one that finds the name taken says
 * so (an error, again every CSYNC_CLASH_LOG_S while it lasts) and stays out of the row. */
static void csync_name_check(struct cluster_sync *cs, bool registered)
{
    int64_t now = csync_now_ms();
    if (registered) {
        if (cs->name_taken)
            log_info("cluster", "node name \"%s\" registered: the other node using it is gone",
                     cs->node_name);
        cs->name_taken = false;
        return;
    }
    if (cs->name_taken && now - cs->clash_logged_ms < CSYNC_CLASH_LOG_S * 1000)
        return;
    cs->name_taken = true;
    cs->clash_logged_ms = now;
    log_error("cluster",
              "node name \"%s\" is in use by another live node: this node is not "
              "registered (other nodes and tunnel clients do not see it); give each node "
              "its own cluster.node_name",
              cs->node_name);
}

static bool csync_is_self(const struct cluster_sync *cs, const struct csync_node *d)
{
    return strcmp(d->name, cs->node_name) == 0;
}

json_t *cluster_sync_nodes_json(struct cluster_sync *cs)
{
    json_t *arr = json_array();
    bool self_seen = false;
    for (size_t i = 0; cs && i < cs->nodes_len; i++) {
        const struct csync_node *d = &cs->nodes[i];
        bool self = csync_is_self(cs, d);
        self_seen |= self;
        /* This node's own numbers are live; the others' are their last heartbeat. */
        json_array_append_new(
            arr, json_pack("{s:s, s:s, s:b, s:I, s:I, s:I}", "name", d->name, "advertise",
                           d->advertise, "alive", self ? 1 : d->alive, "clients",
                           (json_int_t)(self && cs->srv->tunnel
                                            ? tunnel_server_client_count(cs->srv->tunnel)
                                            : (size_t)d->clients),
                           "mappings_listening",
                           (json_int_t)(self ? csync_listening(cs) : (size_t)d->mappings_listening),
                           "heartbeat_at", (json_int_t)d->heartbeat_at));
    }
    if (cs && !self_seen) /* not registered yet (database slow or away) */
        json_array_append_new(
            arr, json_pack("{s:s, s:s, s:b, s:I, s:I, s:n}", "name", cs->node_name, "advertise",
                           cs->srv->cfg->cluster_advertise, "alive", 1, "clients",
                           (json_int_t)(cs->srv->tunnel
                                            ? tunnel_server_client_count(cs->srv->tunnel)
                                            : 0),
                           "mappings_listening", (json_int_t)csync_listening(cs),
                           "heartbeat_at"));
    return json_pack("{s:o, s:I}", "nodes", arr, "count", (json_int_t)json_array_size(arr));
}

void cluster_sync_mapping_nodes(struct cluster_sync *cs, const struct mapping *m, json_t *obj)
{
    if (!cs)
        return;
    json_t *nodes = json_object();
    char key[8];
    snprintf(key, sizeof(key), "%d", m->rec.port);
    json_object_set_new(nodes, cs->node_name, json_string(mapping_status_name(mapping_status(m))));
    for (size_t i = 0; i < cs->nodes_len; i++) {
        const struct csync_node *d = &cs->nodes[i];
        if (!d->alive || csync_is_self(cs, d))
            continue;
        /* A node that has not heard of the mapping yet (its last heartbeat came first). */
        const char *st = json_string_value(json_object_get(d->statuses, key));
        json_object_set_new(nodes, d->name, json_string(st ? st : "pending"));
    }
    json_object_set_new(obj, "nodes", nodes);
}

json_t *cluster_sync_advertised_json(struct cluster_sync *cs)
{
    /* Before the first read of the nodes table (just started, database slow) this node
     * knows only itself: a list of one would tell every client to drop its sessions to
     * the other nodes. No list says nothing (the client keeps what it has); the list
     * goes out as a Notice once it is known. */
    if (!cs || cs->nodes_read_at == 0) /* the read always has a row: this node's own */
        return NULL;
    json_t *arr = json_array();
    const char *own = cs->srv->cfg->cluster_advertise;
    if (own && *own)
        json_array_append_new(arr, json_string(own));
    for (size_t i = 0; i < cs->nodes_len; i++) {
        const struct csync_node *d = &cs->nodes[i];
        if (d->alive && !csync_is_self(cs, d) && d->advertise[0])
            json_array_append_new(arr, json_string(d->advertise));
    }
    return arr;
}

void cluster_sync_metrics(struct cluster_sync *cs, FILE *f)
{
    if (!cs)
        return;
    size_t alive = 0;
    bool self_seen = false;
    for (size_t i = 0; i < cs->nodes_len; i++) {
        alive += cs->nodes[i].alive || csync_is_self(cs, &cs->nodes[i]);
        self_seen |= csync_is_self(cs, &cs->nodes[i]);
    }
    if (!self_seen)
        alive++;
    fprintf(f, "# HELP portmux_cluster_nodes Nodes of the cluster by state (SPEC 7).\n"
               "# TYPE portmux_cluster_nodes gauge\n"
               "portmux_cluster_nodes{state=\"alive\"} %zu\n"
               "portmux_cluster_nodes{state=\"gone\"} %zu\n",
            alive, cs->nodes_len + !self_seen - alive);
    fprintf(f, "# HELP portmux_cluster_database_up 1 while the change feed is connected.\n"
               "# TYPE portmux_cluster_database_up gauge\n"
               "portmux_cluster_database_up %d\n",
            cs->state == CSYNC_READY);
}

/* A local write ended without storing (a lost race on a port, a timeout): the registry
 * skipped the rows it concerned while it was in flight (mapping_registry_apply), so
 * read the tables again now rather than at the next periodic resync. */
static void csync_after_write(enum store_result r, void *arg)
{
    struct cluster_sync *cs = arg;
    /* Its own notification brings a read, but it may have come (with another node's
     * change of the same row) while the write was in flight, and that read passed the
     * port over: nothing else would bring the other change before the periodic resync. */
    if (r == STORE_OK && !cs->passed_over)
        return;
    cs->passed_over = false;
    cs->dirty = true;
    csync_kick(cs);
}

struct cluster_sync *cluster_sync_new(struct server *srv, const char *conninfo)
{
    struct cluster_sync *cs = calloc(1, sizeof(*cs));
    if (!cs)
        return NULL;
    cs->srv = srv;
    cs->conninfo = strdup(conninfo);
    cs->tick = event_new(srv->base, -1, EV_PERSIST, csync_on_tick, cs);
    cs->retry = evtimer_new(srv->base, csync_on_retry, cs);
    cs->beat = event_new(srv->base, -1, EV_PERSIST, csync_on_beat, cs);
    struct timeval every = {CSYNC_RESYNC_S, 0}, beat = {CSYNC_HEARTBEAT_S, 0};
    csync_default_name(cs);
    csync_new_instance(cs);
    if (!cs->conninfo || !cs->tick || !cs->retry || !cs->beat ||
        event_add(cs->tick, &every) != 0 || event_add(cs->beat, &beat) != 0) {
        cluster_sync_free(cs);
        return NULL;
    }
    store_set_gate(srv->store, csync_db_ok, cs);
    store_set_write_hook(srv->store, csync_after_write, cs);
    csync_connect(cs);
    return cs;
}

void cluster_sync_free(struct cluster_sync *cs)
{
    if (!cs)
        return;
    store_set_gate(cs->srv->store, NULL, NULL);
    store_set_write_hook(cs->srv->store, NULL, NULL);
    pg_dial_cancel(cs->dial);
    csync_free_events(cs);
    if (cs->tick)
        event_free(cs->tick);
    if (cs->retry)
        event_free(cs->retry);
    if (cs->beat)
        event_free(cs->beat);
    csync_nodes_clear(cs);
    if (cs->conn)
        PQfinish(cs->conn);
    free(cs->conninfo);
    free(cs);
}

uint64_t cluster_sync_resyncs(const struct cluster_sync *cs)
{
    return cs ? cs->resyncs : 0;
}

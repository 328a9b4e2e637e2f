/* Propagation between nodes (SPEC §7): a second PostgreSQL connection, entirely
 * asynchronous on the event loop, that LISTENs on portmux_mappings and reads the whole
 * mappings table after every notification, every CSYNC_RESYNC_S seconds and after every
 * (re)connect, then brings the live registry in line with it.
 *
 * Nothing here blocks: the connect is driven by PQconnectPoll from socket events, the
 * reads are PQsendQuery with their results taken as the socket becomes readable. A
 * stopped database only means no events; a lost connection is reopened with backoff. */
#include "cluster_sync.h"

#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "log.h"
#include "mapping.h"
#include "server.h"
#include "store.h"
#include "store_pg.h"

#define CSYNC_RESYNC_S 30
#define CSYNC_BACKOFF_MAX_S 30
#define CSYNC_SELECT "SELECT " PG_MAP_COLS " FROM mappings ORDER BY port"

enum csync_state { CSYNC_DOWN, CSYNC_CONNECTING, CSYNC_READY };

struct cluster_sync {
    struct server *srv;
    char *conninfo;
    PGconn *conn;
    enum csync_state state;
    struct event *sock_ev;   /* the connection's socket: connect steps, then reads */
    struct event *flush_ev;  /* writable, while a query is not fully sent */
    struct event *tick;      /* resync every CSYNC_RESYNC_S s */
    struct event *retry;     /* reconnect after backoff */
    int backoff_s;
    bool busy;               /* a query is in flight */
    bool dirty;              /* read the table again once the current query is done */
    uint64_t sent_writes;    /* store_write_count when the read was sent */
    unsigned char seen[65536 / 8]; /* ports present in the read being applied */
    uint64_t resyncs;        /* reads applied, for the log and tests */
};

static void csync_connect(struct cluster_sync *cs);
static void csync_on_sock(evutil_socket_t fd, short what, void *arg);

static void csync_log_conn_error(struct cluster_sync *cs, const char *what)
{
    char msg[256];
    snprintf(msg, sizeof(msg), "%s", cs->conn ? PQerrorMessage(cs->conn) : "out of memory");
    for (char *p = msg; *p; p++)
        if (*p == '\n' || *p == '\r' || *p == '\t')
            *p = ' ';
    log_warn("cluster", "%s: %s", what, msg);
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
static void csync_lost(struct cluster_sync *cs, const char *what)
{
    csync_log_conn_error(cs, what);
    csync_free_events(cs);
    if (cs->conn)
        PQfinish(cs->conn);
    cs->conn = NULL;
    cs->state = CSYNC_DOWN;
    cs->busy = false;
    cs->backoff_s = cs->backoff_s ? cs->backoff_s * 2 : 1;
    if (cs->backoff_s > CSYNC_BACKOFF_MAX_S)
        cs->backoff_s = CSYNC_BACKOFF_MAX_S;
    struct timeval tv = {cs->backoff_s, 0};
    evtimer_add(cs->retry, &tv);
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

/* Sends sql unless a query is in flight (then marks dirty, to read again after it). */
static void csync_send(struct cluster_sync *cs, const char *sql)
{
    if (cs->state != CSYNC_READY || cs->busy) {
        cs->dirty = true;
        return;
    }
    cs->dirty = false;
    cs->sent_writes = store_write_count(cs->srv->store);
    if (!PQsendQuery(cs->conn, sql)) {
        csync_lost(cs, "querying the database");
        return;
    }
    cs->busy = true;
    csync_flush(cs);
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
        changed += mapping_registry_apply(reg, rec);
    }
    free(rec);
    struct mapping *m = mapping_registry_first(reg);
    while (m) {
        struct mapping *next = mapping_registry_next(m);
        if (!csync_marked(cs, m->rec.port))
            changed += mapping_registry_forget(reg, m->rec.port);
        m = next;
    }
    cs->resyncs++;
    if (changed)
        log_info("cluster", "resync: %d mapping(s) changed by other nodes", changed);
}

static void csync_on_result(struct cluster_sync *cs, PGresult *r)
{
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_TUPLES_OK) {
        csync_apply(cs, r);
    } else if (st != PGRES_COMMAND_OK) {
        char msg[256];
        snprintf(msg, sizeof(msg), "%s", PQresultErrorMessage(r));
        msg[strcspn(msg, "\r\n")] = '\0';
        log_warn("cluster", "reading mappings: %s", msg);
        cs->dirty = true;
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
    if (cs->dirty && !cs->busy)
        csync_send(cs, CSYNC_SELECT);
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
    log_info("cluster", "listening for changes from other nodes");
    csync_send(cs, "LISTEN portmux_mappings; " CSYNC_SELECT);
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

static void csync_connect(struct cluster_sync *cs)
{
    cs->conn = PQconnectStart(cs->conninfo);
    if (!cs->conn || PQstatus(cs->conn) == CONNECTION_BAD) {
        csync_lost(cs, "connecting to the database");
        return;
    }
    PQsetNoticeProcessor(cs->conn, store_pg_notice, NULL);
    cs->state = CSYNC_CONNECTING;
    /* libpq's first step wants the socket writable (the connect in progress). */
    csync_free_events(cs);
    cs->sock_ev = event_new(cs->srv->base, PQsocket(cs->conn), EV_WRITE, csync_on_sock, cs);
    if (!cs->sock_ev || event_add(cs->sock_ev, NULL) != 0)
        csync_lost(cs, "watching the database socket");
}

static void csync_on_retry(evutil_socket_t fd, short what, void *arg)
{
    csync_connect(arg);
}

static void csync_on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct cluster_sync *cs = arg;
    if (cs->state == CSYNC_READY)
        csync_send(cs, CSYNC_SELECT);
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
    struct timeval every = {CSYNC_RESYNC_S, 0};
    if (!cs->conninfo || !cs->tick || !cs->retry || event_add(cs->tick, &every) != 0) {
        cluster_sync_free(cs);
        return NULL;
    }
    csync_connect(cs);
    return cs;
}

void cluster_sync_free(struct cluster_sync *cs)
{
    if (!cs)
        return;
    csync_free_events(cs);
    if (cs->tick)
        event_free(cs->tick);
    if (cs->retry)
        event_free(cs->retry);
    if (cs->conn)
        PQfinish(cs->conn);
    free(cs->conninfo);
    free(cs);
}

uint64_t cluster_sync_resyncs(const struct cluster_sync *cs)
{
    return cs ? cs->resyncs : 0;
}

/* PostgreSQL backend of the store (SPEC §7): connecting, migrations under an advisory
 * lock, and the mapping and client statements, all with libpq.
 *
 * Start-up (open, migrations, the first reads) may block: the node serves nothing yet.
 * The synchronous calls (start-up, tests) send each statement with libpq's non-blocking
 * API and await its answer with poll() and a hard deadline (PG_CALL_MS), so a database
 * that is slow, stopped or gone costs a call at most that long and then answers
 * STORE_UNAVAILABLE (the API's 503 store_unavailable); the broken connection is dropped
 * and reopened, with backoff, by a later call.
 *
 * Once the loop is attached (store_attach_loop) writes never wait on it: they go to the
 * write connection below (pgw_*), driven by libevent events, with the same deadline. */
#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <time.h>

#include <event2/event.h>

#include "embed.h"
#include "log.h"
#include "pg_dial.h"
#include "store.h"
#include "store_backend.h"
#include "store_pg.h"

extern const struct embedded_file embedded_pg_migrations[];
extern const size_t embedded_pg_migrations_count;

/* A write must answer within 2 s (SPEC §3/§7); the rest is the API's own work. */
#define PG_CALL_MS 1500
/* Start-up waits longer: a database that is starting too (compose, systemd). */
#define PG_OPEN_MS 10000
/* Reconnect backoff after a failed connect: doubles from 1 s up to this. */
#define PG_BACKOFF_MAX_S 30
/* Any constant both backends agree on; it names the migration lock in pg_locks. */
#define PG_MIGRATION_LOCK_KEY 0x706f72746d7578LL /* "portmux" */
/* How long a start waits for another session's migration lock, and how often it asks. */
#define PG_MIGRATION_WAIT_MS 60000
#define PG_MIGRATION_POLL_MS 200

struct pg_store {
    PGconn *conn;          /* NULL while disconnected */
    char *conninfo;
    char where[128];       /* host:port/db for log lines; never the password */
    time_t retry_at;       /* no connect attempt before this (backoff) */
    int backoff_s;
    /* The write connection on the loop (store_attach_loop; pgw_*): NULL base = none. */
    struct event_base *base;
    struct evdns_base *dns;
    struct pg_dial *wdial; /* resolving the host names of a reconnect (pg_dial.h) */
    PGconn *wconn;
    enum { PGW_DOWN, PGW_CONNECTING, PGW_IDLE, PGW_BUSY } wstate;
    enum { PGW_BEGIN, PGW_STMT, PGW_END } wstep;
    struct event *wsock;   /* connect steps, then readable (persistent) */
    struct event *wflush;  /* writable, while a statement is not fully sent */
    struct event *wdeadline; /* the head write's deadline */
    TAILQ_HEAD(, store_op) wqueue; /* FIFO; the head is in progress when PGW_BUSY */
    struct pg_stmt *wstmt; /* the head's statement, kept for its outcome */
    PGresult *wgot;        /* the first result of the step in progress */
    PGresult *wres;        /* the statement's result, while COMMIT or ROLLBACK runs */
    bool wstmt_ok;         /* the statement succeeded: the end step is COMMIT */
    bool wsent;            /* the current step's query left libpq (some of it may be out) */
};

static const char *const pg_proxy_names[] = {"none", "v1", "v2"};

static int64_t pg_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* libpq's messages end with a newline (and may hold several lines): one line for logs. */
static void pg_one_line(char *dst, size_t cap, const char *msg)
{
    snprintf(dst, cap, "%s", msg ? msg : "unknown error");
    for (char *p = dst; *p; p++)
        if (*p == '\n' || *p == '\r' || *p == '\t')
            *p = ' ';
    size_t n = strlen(dst);
    while (n > 0 && dst[n - 1] == ' ')
        dst[--n] = '\0';
}

/* Waits until the socket is ready for events, or the deadline. 1 ready, 0 timeout, -1 error. */
static int pg_poll(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - pg_now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int rc = poll(&p, 1, (int)left);
        if (rc < 0 && errno == EINTR)
            continue;
        return rc < 0 ? -1 : rc > 0;
    }
}

/* Server notices ("relation already exists, skipping") go to the debug log, one line
 * each, instead of libpq's default of stderr. */
void store_pg_notice(void *arg, const char *message)
{
    char line[256];
    pg_one_line(line, sizeof(line), message);
    log_debug("store", "postgres: %s", line);
}

/* PQconnectStart for conninfo (a URL or key=value string) with application_name `name`
 * unless conninfo names one: pg_stat_activity then tells the node's connections apart.
 * For the start-up connection only, before the loop runs: its host names are resolved
 * by libpq (getaddrinfo); the loop's connections go through pg_dial. */
static PGconn *store_pg_connect_start(const char *conninfo, const char *name)
{
    /* options first: a later keyword overrides it, the conninfo's own included. */
    const char *opts = pg_session_options();
    const char *const keys[] = {"options", "dbname", "fallback_application_name", NULL};
    const char *const values[] = {opts ? opts : "", conninfo, name, NULL};
    return PQconnectStartParams(keys, values, 1); /* 1: dbname is the whole conninfo */
}

/* Drives PQconnectPoll to the end or the deadline. */
static PGconn *pg_connect(const char *conninfo, int64_t deadline, char *msg, size_t msglen)
{
    PGconn *c = store_pg_connect_start(conninfo, "portmux-store");
    if (!c) {
        snprintf(msg, msglen, "out of memory");
        return NULL;
    }
    if (PQstatus(c) == CONNECTION_BAD)
        goto fail;
    PQsetNoticeProcessor(c, store_pg_notice, NULL);
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK) {
        if (st == PGRES_POLLING_FAILED)
            goto fail;
        int ready = pg_poll(PQsocket(c), st == PGRES_POLLING_READING ? POLLIN : POLLOUT,
                            deadline);
        if (ready <= 0) {
            snprintf(msg, msglen, "%s", ready == 0 ? "no answer in time" : strerror(errno));
            PQfinish(c);
            return NULL;
        }
        st = PQconnectPoll(c);
    }
    if (PQsetnonblocking(c, 1) != 0)
        goto fail;
    return c;
fail:
    pg_one_line(msg, msglen, PQerrorMessage(c));
    PQfinish(c);
    return NULL;
}

static void pg_drop(struct pg_store *pg)
{
    if (pg->conn)
        PQfinish(pg->conn);
    pg->conn = NULL;
}

/* A terminated backend sends FATAL, then closes: the first read takes the message (a
 * notice while idle), the second sees the end of the stream. Neither blocks. */
static bool pg_alive(PGconn *c)
{
    for (int i = 0; i < 2; i++) {
        if (!PQconsumeInput(c) || PQstatus(c) != CONNECTION_OK)
            return false;
        (void)PQisBusy(c); /* parses what was read: the FATAL above */
    }
    return PQstatus(c) == CONNECTION_OK;
}

/* No connect attempt for a while (1 s doubling to PG_BACKOFF_MAX_S): while the database
 * is away, writes answer STORE_UNAVAILABLE at once instead of each waiting out a
 * deadline on the loop. */
static void pg_backoff(struct pg_store *pg)
{
    pg->backoff_s = pg->backoff_s ? pg->backoff_s * 2 : 1;
    if (pg->backoff_s > PG_BACKOFF_MAX_S)
        pg->backoff_s = PG_BACKOFF_MAX_S;
    pg->retry_at = time(NULL) + pg->backoff_s;
}

/* A connection to use now, reconnecting when the last one broke and the backoff allows. */
static PGconn *pg_conn(struct pg_store *pg)
{
    /* An idle connection the server closed (restart, pg_terminate_backend) shows only on
     * a read; this one does not block, so a write is not refused for a stale socket. */
    if (pg->conn && pg_alive(pg->conn))
        return pg->conn;
    if (pg->conn)
        log_warn("store", "%s: connection lost; reconnecting", pg->where);
    pg_drop(pg);
    time_t now = time(NULL);
    if (now < pg->retry_at)
        return NULL;
    char msg[256];
    pg->conn = pg_connect(pg->conninfo, pg_now_ms() + PG_CALL_MS, msg, sizeof(msg));
    if (!pg->conn) {
        pg_backoff(pg);
        log_warn("store", "%s: reconnect failed (%s); next try in %d s", pg->where, msg,
                 pg->backoff_s);
        return NULL;
    }
    pg->backoff_s = 0;
    pg->retry_at = 0;
    log_info("store", "%s: reconnected", pg->where);
    return pg->conn;
}

/* Sends one statement on c and collects its result by the deadline. Returns the result
 * (caller PQclears; it may hold an error), or NULL when the connection gave no answer. */
static PGresult *pg_exchange(PGconn *c, const char *sql, int n, const char *const *vals,
                             int64_t deadline)
{
    if (!PQsendQueryParams(c, sql, n, NULL, vals, NULL, NULL, 0))
        return NULL;
    int f;
    while ((f = PQflush(c)) == 1) {
        if (pg_poll(PQsocket(c), POLLIN | POLLOUT, deadline) <= 0)
            return NULL;
        if (!PQconsumeInput(c))
            return NULL;
    }
    if (f < 0)
        return NULL;
    PGresult *res = NULL;
    for (;;) {
        while (PQisBusy(c)) {
            if (pg_poll(PQsocket(c), POLLIN, deadline) <= 0 || !PQconsumeInput(c)) {
                PQclear(res);
                return NULL;
            }
        }
        PGresult *r = PQgetResult(c);
        if (!r)
            break;
        /* One statement gives one result; keep it, free anything after. */
        if (res)
            PQclear(r);
        else
            res = r;
    }
    return res;
}

static bool pg_command_ok(PGresult *res)
{
    return res && PQresultStatus(res) == PGRES_COMMAND_OK;
}

/* Sends one statement and collects its result within the deadline. Returns the result
 * (caller PQclears), or NULL with *unavailable set when the database did not answer.
 *
 * A write (tx) runs as BEGIN, the statement, COMMIT, each sent only after the previous
 * answered. Dropping a connection does not take back what was already sent: a database
 * that was frozen reads it on SIGCONT and, in autocommit, would store a write the API
 * answered 503 for. Inside an open transaction the drop rolls it back instead; only a
 * COMMIT sent and then not answered in time leaves the outcome open. */
static PGresult *pg_call(struct pg_store *pg, const char *sql, int n, const char *const *vals,
                         bool tx, bool *unavailable)
{
    *unavailable = true;
    PGconn *c = pg_conn(pg);
    if (!c)
        return NULL;
    int64_t deadline = pg_now_ms() + PG_CALL_MS;
    PGresult *res = NULL, *end = NULL;
    if (tx) {
        PGresult *begin = pg_exchange(c, "BEGIN", 0, NULL, deadline);
        bool ok = pg_command_ok(begin);
        if (begin && !ok) {
            *unavailable = false; /* answered, but refused: the statement's own error */
            return begin;
        }
        PQclear(begin);
        if (!ok)
            goto broken;
    }
    res = pg_exchange(c, sql, n, vals, deadline);
    if (!res)
        goto broken;
    if (tx) {
        ExecStatusType st = PQresultStatus(res);
        bool done = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
        end = pg_exchange(c, done ? "COMMIT" : "ROLLBACK", 0, NULL, deadline);
        if (!end)
            goto broken;
        if (done && !pg_command_ok(end)) {
            /* The commit failed: its error is the write's outcome. */
            PQclear(res);
            res = end;
            end = NULL;
        }
        PQclear(end);
    }
    *unavailable = false;
    return res;
broken:;
    PQclear(res);
    char msg[256];
    pg_one_line(msg, sizeof(msg), PQerrorMessage(c));
    log_warn("store", "%s: no answer within %d ms (%s); dropping the connection", pg->where,
             PG_CALL_MS, msg[0] ? msg : "timeout");
    pg_drop(pg);
    pg_backoff(pg);
    return NULL;
}

/* The outcome of a command: STORE_OK, STORE_DUPLICATE on a unique violation,
 * STORE_UNAVAILABLE without an answer, STORE_ERR (logged) for anything else. */
static enum store_result pg_check(struct pg_store *pg, PGresult *res, bool unavailable,
                                  ExecStatusType want, const char *what)
{
    if (!res)
        return unavailable ? STORE_UNAVAILABLE : STORE_ERR;
    if (PQresultStatus(res) == want)
        return STORE_OK;
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if (state && strcmp(state, "23505") == 0)
        return STORE_DUPLICATE;
    char msg[256];
    pg_one_line(msg, sizeof(msg), PQresultErrorMessage(res));
    log_error("store", "%s: %s: %s", pg->where, what, msg);
    return STORE_ERR;
}

static enum store_result pg_run(struct pg_store *pg, bool tx, const char *sql, int n,
                                const char *const *vals, ExecStatusType want, const char *what,
                                PGresult **out)
{
    bool unavailable;
    PGresult *res = pg_call(pg, sql, n, vals, tx, &unavailable);
    enum store_result r = pg_check(pg, res, unavailable, want, what);
    if (r == STORE_OK && out) {
        *out = res;
        return r;
    }
    PQclear(res);
    return r;
}

/* A read: one statement in autocommit. */
static enum store_result pg_command(struct pg_store *pg, const char *sql, int n,
                                    const char *const *vals, ExecStatusType want,
                                    const char *what, PGresult **out)
{
    return pg_run(pg, false, sql, n, vals, want, what, out);
}

/* A write: in its own transaction (pg_call says why). */
static enum store_result pg_write(struct pg_store *pg, const char *sql, int n,
                                  const char *const *vals, ExecStatusType want,
                                  const char *what, PGresult **out)
{
    return pg_run(pg, true, sql, n, vals, want, what, out);
}

/* ---- open and migrations (start-up: blocking is fine here) ---- */

/* Open-time statement without parameters (several allowed); 0 or -1 with err set. */
static int pg_exec_open(struct pg_store *pg, const char *sql, const char *what, char *err,
                        size_t errlen, PGresult **out)
{
    PGresult *res = PQexec(pg->conn, sql);
    ExecStatusType st = PQresultStatus(res);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        if (out)
            *out = res;
        else
            PQclear(res);
        return 0;
    }
    char msg[256];
    pg_one_line(msg, sizeof(msg), res ? PQresultErrorMessage(res) : PQerrorMessage(pg->conn));
    store_set_err(err, errlen, "database %s: %s: %s", pg->where, what, msg);
    log_error("store", "database %s: %s: %s", pg->where, what, msg);
    PQclear(res);
    return -1;
}

/* The migration lock, asked for every PG_MIGRATION_POLL_MS rather than waited on: another
 * node applying migrations holds it for a moment, but one stuck in the middle of them (or
 * a session an operator left open) would hold this start for ever, without a word. */
static int pg_migration_lock(struct pg_store *pg, char *err, size_t errlen)
{
    char sql[128];
    snprintf(sql, sizeof(sql), "SELECT pg_try_advisory_lock(%lld)", PG_MIGRATION_LOCK_KEY);
    int64_t deadline = pg_now_ms() + PG_MIGRATION_WAIT_MS;
    for (bool waited = false;; waited = true) {
        PGresult *res = NULL;
        if (pg_exec_open(pg, sql, "taking the migration lock", err, errlen, &res) != 0)
            return -1;
        bool taken = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
        PQclear(res);
        if (taken) {
            if (waited)
                log_info("store", "database %s: migration lock taken", pg->where);
            return 0;
        }
        if (!waited)
            log_warn("store",
                     "database %s: waiting for the migration lock: another session holds it "
                     "(a node applying migrations, or one stuck: see pg_locks, advisory "
                     "lock %lld)",
                     pg->where, PG_MIGRATION_LOCK_KEY);
        if (pg_now_ms() >= deadline) {
            store_set_err(err, errlen,
                          "database %s: the migration lock stayed held by another session "
                          "for %d s",
                          pg->where, PG_MIGRATION_WAIT_MS / 1000);
            log_error("store", "%s", err ? err : "the migration lock stayed held");
            return -1;
        }
        poll(NULL, 0, PG_MIGRATION_POLL_MS);
    }
}

/* Applies pending migrations, each in its own transaction with its row in
 * schema_migrations, while holding the advisory lock: a second node starting at the same
 * moment waits here and then finds nothing left to apply. */
static int pg_migrate(struct pg_store *pg, struct store_open_info *info,
                      enum store_result *result, char *err, size_t errlen)
{
    char sql[128];
    int newest = 0, version = 0, applied = 0, rc = -1;
    for (size_t i = 0; i < embedded_pg_migrations_count; i++) {
        int v = store_migration_version(embedded_pg_migrations[i].path);
        if (v <= newest) {
            store_set_err(err, errlen, "embedded migration pg/%s: bad or repeated version",
                          embedded_pg_migrations[i].path);
            return -1;
        }
        newest = v;
    }
    if (pg_migration_lock(pg, err, errlen) != 0)
        return -1;
    if (pg_exec_open(pg,
                     "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY "
                     "KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
                     "creating schema_migrations", err, errlen, NULL) != 0)
        goto unlock;
    PGresult *res = NULL;
    if (pg_exec_open(pg, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                     "reading the schema version", err, errlen, &res) != 0)
        goto unlock;
    version = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    if (version > newest) {
        store_set_err(err, errlen,
                      "database %s has schema version %d, this portmux knows up to %d; "
                      "refusing to start",
                      pg->where, version, newest);
        log_error("store", "%s", err ? err : "database schema is newer than this portmux");
        *result = STORE_TOO_NEW;
        goto unlock;
    }
    for (size_t i = 0; i < embedded_pg_migrations_count; i++) {
        const struct embedded_file *m = &embedded_pg_migrations[i];
        int v = store_migration_version(m->path);
        if (v <= version)
            continue;
        if (pg_exec_open(pg, "BEGIN", "starting a migration", err, errlen, NULL) != 0)
            goto unlock;
        const char *vals[3];
        char vtext[16], now[24];
        snprintf(vtext, sizeof(vtext), "%d", v);
        snprintf(now, sizeof(now), "%lld", (long long)time(NULL));
        vals[0] = vtext;
        vals[1] = m->path;
        vals[2] = now;
        if (pg_exec_open(pg, (const char *)m->data, m->path, err, errlen, NULL) != 0) {
            PQclear(PQexec(pg->conn, "ROLLBACK"));
            goto unlock;
        }
        res = PQexecParams(pg->conn,
                           "INSERT INTO schema_migrations (version, name, applied_at) "
                           "VALUES ($1, $2, $3)",
                           3, NULL, vals, NULL, NULL, 0);
        bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        PQclear(res);
        if (!ok || pg_exec_open(pg, "COMMIT", "committing a migration", err, errlen, NULL)) {
            store_set_err(err, errlen, "database %s: recording migration %s failed",
                          pg->where, m->path);
            PQclear(PQexec(pg->conn, "ROLLBACK"));
            goto unlock;
        }
        applied++;
        version = v;
    }
    info->schema_version = version;
    info->migrations_applied = applied;
    if (applied > 0)
        log_info("store", "%s: applied %d migration(s), schema version %d", pg->where,
                 applied, version);
    rc = 0;
unlock:
    snprintf(sql, sizeof(sql), "SELECT pg_advisory_unlock(%lld)", PG_MIGRATION_LOCK_KEY);
    PQclear(PQexec(pg->conn, sql));
    return rc;
}

static void pgw_close(struct pg_store *pg);

static void pg_close(void *impl)
{
    struct pg_store *pg = impl;
    pgw_close(pg);
    pg_drop(pg);
    free(pg->conninfo);
    free(pg);
}

static void *pg_open(const char *location, struct store_open_info *info,
                     enum store_result *result, char *err, size_t errlen)
{
    struct pg_store *pg = calloc(1, sizeof(*pg));
    if (!pg || !(pg->conninfo = strdup(location))) {
        free(pg);
        store_set_err(err, errlen, "out of memory");
        return NULL;
    }
    snprintf(pg->where, sizeof(pg->where), "postgres");
    TAILQ_INIT(&pg->wqueue);
    char msg[256];
    pg->conn = pg_connect(location, pg_now_ms() + PG_OPEN_MS, msg, sizeof(msg));
    if (!pg->conn) {
        store_set_err(err, errlen, "database: cannot connect: %s", msg);
        log_error("store", "database: cannot connect: %s", msg);
        goto fail;
    }
    /* Named from what the server says, so the URL's password never reaches a log. */
    snprintf(pg->where, sizeof(pg->where), "postgres %.40s:%.8s/%.60s", PQhost(pg->conn),
             PQport(pg->conn), PQdb(pg->conn));
    /* Open-time statements run blocking; everything later goes through pg_call. */
    PQsetnonblocking(pg->conn, 0);
    if (pg_migrate(pg, info, result, err, errlen) != 0)
        goto fail;
    if (PQsetnonblocking(pg->conn, 1) != 0) {
        store_set_err(err, errlen, "database %s: cannot switch to non-blocking", pg->where);
        goto fail;
    }
    return pg;
fail:
    pg_close(pg);
    return NULL;
}

/* ---- mappings ---- */


/* Text parameters $1..$12 in the order of SQLite's binder (?7 is created_at). */
struct pg_map_params {
    char port[8], target_port[8], created[24], maxc[16], rate[24];
    const char *v[12];
};

static void pg_map_params(struct pg_map_params *p, const struct mapping_record *rec,
                          int64_t created_at)
{
    snprintf(p->port, sizeof(p->port), "%d", rec->port);
    snprintf(p->target_port, sizeof(p->target_port), "%d", rec->target_port);
    snprintf(p->created, sizeof(p->created), "%" PRId64, created_at);
    snprintf(p->maxc, sizeof(p->maxc), "%d", rec->max_connections);
    snprintf(p->rate, sizeof(p->rate), "%" PRId64, rec->rate_limit);
    p->v[0] = p->port;
    p->v[1] = rec->target_ip;
    p->v[2] = p->target_port;
    p->v[3] = rec->use_tunnel ? "t" : "f";
    p->v[4] = rec->client;
    p->v[5] = rec->name;
    p->v[6] = p->created;
    p->v[7] = rec->allow_from;
    p->v[8] = pg_proxy_names[rec->proxy_protocol];
    p->v[9] = p->maxc;
    p->v[10] = p->rate;
    p->v[11] = rec->enabled ? "t" : "f";
}

/* Reads "id, created_at" of a RETURNING clause into rec. */
static enum store_result pg_returned(PGresult *res, struct mapping_record *rec)
{
    if (PQntuples(res) != 1) {
        PQclear(res);
        return STORE_NOT_FOUND;
    }
    rec->id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    rec->created_at = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    PQclear(res);
    return STORE_OK;
}

/* STORE_NOT_FOUND when the command touched no row. */
static enum store_result pg_changed(PGresult *res)
{
    bool none = strcmp(PQcmdTuples(res), "0") == 0;
    PQclear(res);
    return none ? STORE_NOT_FOUND : STORE_OK;
}

/* A rotate or remove (change) of the client named $1 while it is the one of id $2 (0:
 * whichever): one removed and created anew elsewhere must not get the old one's hash as
 * its previous token, nor be removed in its place. The two counts tell "no such name"
 * (STORE_NOT_FOUND) from "another client of that name" (STORE_CONFLICT), as the mapping
 * update's cur does. */
#define PG_CLIENT_OF_ID(change)                                                             \
    "WITH cur AS (SELECT id FROM clients WHERE name = $1 FOR UPDATE), "                    \
    "done AS (" change " WHERE id = (SELECT id FROM cur WHERE $2::bigint = 0 OR "          \
    "id = $2::bigint) RETURNING 1) "                                                       \
    "SELECT (SELECT count(*) FROM cur), (SELECT count(*) FROM done)"

/* One write's statement: its SQL and text parameters. The parameters point into the op
 * and into this struct, and are copied by libpq when the statement is sent. */
struct pg_stmt {
    const char *sql;
    int n;
    const char *v[18];
    ExecStatusType want;
    const char *what;
    struct pg_map_params mp;
    struct pg_map_params base; /* UPDATE: the record the change was made from */
    char num[3][24];
    int64_t now;
};

static void pg_stmt_build(struct pg_stmt *s, const struct store_op *op)
{
    memset(s, 0, sizeof(*s));
    s->now = (int64_t)time(NULL);
    s->want = PGRES_COMMAND_OK;
    const struct mapping_record *rec = &op->rec;
    const struct client_record *c = &op->crec;
    switch (op->kind) {
    case STORE_OP_INSERT:
        pg_map_params(&s->mp, rec, s->now);
        memcpy(s->v, s->mp.v, sizeof(s->mp.v));
        s->n = 12;
        s->want = PGRES_TUPLES_OK;
        s->what = "inserting a mapping";
        s->sql = "INSERT INTO mappings (port, target_ip, target_port, use_tunnel, client, name, "
                 "created_at, allow_from, proxy_protocol, max_connections, rate_limit, enabled) "
                 "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
                 "RETURNING id, created_at";
        return;
    case STORE_OP_REPLACE:
        /* A replacement keeps nothing of the old row: a new id from the sequence and a new
         * created_at, in one statement on the row of that port. */
        pg_map_params(&s->mp, rec, s->now);
        memcpy(s->v, s->mp.v, sizeof(s->mp.v));
        s->n = 12;
        s->want = PGRES_TUPLES_OK;
        s->what = "replacing a mapping";
        s->sql = "UPDATE mappings SET id = nextval(pg_get_serial_sequence('mappings', 'id')), "
                 "target_ip = $2, target_port = $3, use_tunnel = $4, client = $5, name = $6, "
                 "created_at = $7, allow_from = $8, proxy_protocol = $9, max_connections = $10, "
                 "rate_limit = $11, enabled = $12 WHERE port = $1 RETURNING id, created_at";
        return;
    case STORE_OP_UPDATE: {
        /* Only the named and changed parts are written ($12, enum store_field): another
         * node may have changed the rest meanwhile. cur locks the row of the port and says
         * whether this write still fits it: the mapping this node knows ($13, its id),
         * and, when the destination is to change, the destination it was made from
         * ($14-$17; $18 false skips that check). No row: removed (STORE_NOT_FOUND); a row
         * that does not fit: STORE_CONFLICT, nothing written; else the row as it now
         * is, both nodes' changes in it. */
        pg_map_params(&s->mp, rec, rec->created_at);
        const int order[11] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11};
        for (int i = 0; i < 11; i++)
            s->v[i] = s->mp.v[order[i]];
        snprintf(s->num[0], sizeof(s->num[0]), "%u", op->fields);
        snprintf(s->num[1], sizeof(s->num[1]), "%" PRId64, rec->id);
        s->v[11] = s->num[0];
        s->v[12] = s->num[1];
        pg_map_params(&s->base, &op->base, op->base.created_at);
        s->v[13] = s->base.v[1];
        s->v[14] = s->base.v[2];
        s->v[15] = s->base.v[3];
        s->v[16] = s->base.v[4];
        s->v[17] = op->has_base && (op->fields & STORE_F_DEST) ? "t" : "f";
        s->n = 18;
        s->want = PGRES_TUPLES_OK;
        s->what = "updating a mapping";
        s->sql = "WITH cur AS (SELECT port, (id = $13::bigint OR $13::bigint = 0) AND "
                 "(NOT $18::boolean OR (target_ip, target_port, use_tunnel, client) = "
                 "($14::text, $15::int, $16::boolean, $17::text)) AS fits "
                 "FROM mappings WHERE port = $1::int FOR UPDATE), "
                 "upd AS (UPDATE mappings SET "
                 "target_ip = CASE WHEN $12::int & 1 <> 0 THEN $2::text ELSE target_ip END, "
                 "target_port = CASE WHEN $12::int & 1 <> 0 THEN $3::int ELSE target_port END, "
                 "use_tunnel = CASE WHEN $12::int & 1 <> 0 THEN $4::boolean ELSE use_tunnel END, "
                 "client = CASE WHEN $12::int & 1 <> 0 THEN $5::text ELSE client END, "
                 "name = CASE WHEN $12::int & 2 <> 0 THEN $6::text ELSE name END, "
                 "allow_from = CASE WHEN $12::int & 4 <> 0 THEN $7::text ELSE allow_from END, "
                 "proxy_protocol = CASE WHEN $12::int & 8 <> 0 THEN $8::text "
                 "ELSE proxy_protocol END, "
                 "max_connections = CASE WHEN $12::int & 16 <> 0 THEN $9::int "
                 "ELSE max_connections END, "
                 "rate_limit = CASE WHEN $12::int & 32 <> 0 THEN $10::bigint ELSE rate_limit END, "
                 "enabled = CASE WHEN $12::int & 64 <> 0 THEN $11::boolean ELSE enabled END "
                 "WHERE port = (SELECT port FROM cur WHERE fits) RETURNING " PG_MAP_COLS ") "
                 "SELECT upd.*, cur.fits FROM cur LEFT JOIN upd ON true";
        return;
    }
    case STORE_OP_DELETE:
        snprintf(s->num[0], sizeof(s->num[0]), "%d", rec->port);
        s->v[0] = s->num[0];
        s->n = 1;
        s->what = "deleting a mapping";
        s->sql = "DELETE FROM mappings WHERE port = $1";
        return;
    case STORE_OP_CLIENT_INSERT:
        snprintf(s->num[0], sizeof(s->num[0]), "%" PRId64, c->prev_valid_until);
        snprintf(s->num[1], sizeof(s->num[1]), "%" PRId64, s->now);
        snprintf(s->num[2], sizeof(s->num[2]), "%" PRId64, c->last_seen);
        s->v[0] = c->name;
        s->v[1] = c->token_hash;
        s->v[2] = c->prev_hash;
        s->v[3] = s->num[0];
        s->v[4] = c->source[0] ? c->source : "api";
        s->v[5] = s->num[1];
        s->v[6] = s->num[2];
        s->n = 7;
        s->want = PGRES_TUPLES_OK;
        s->what = "inserting a client";
        s->sql = "INSERT INTO clients (" PG_CLIENT_COLS ") VALUES ($1, $2, $3, $4, $5, $6, $7) "
                 "RETURNING id";
        return;
    case STORE_OP_CLIENT_UPDATE:
        snprintf(s->num[0], sizeof(s->num[0]), "%" PRId64, c->id);
        snprintf(s->num[1], sizeof(s->num[1]), "%" PRId64, c->prev_valid_until);
        snprintf(s->num[2], sizeof(s->num[2]), "%" PRId64, c->last_seen);
        s->v[0] = c->name;
        s->v[1] = s->num[0];
        s->v[2] = c->token_hash;
        s->v[3] = c->prev_hash;
        s->v[4] = s->num[1];
        s->v[5] = s->num[2];
        s->n = 6;
        s->want = PGRES_TUPLES_OK;
        s->what = "updating a client";
        s->sql = PG_CLIENT_OF_ID("UPDATE clients SET token_hash = $3, prev_hash = $4, "
                                 "prev_valid_until = $5, last_seen = $6");
        return;
    case STORE_OP_CLIENT_DELETE:
        snprintf(s->num[0], sizeof(s->num[0]), "%" PRId64, c->id);
        s->v[0] = c->name;
        s->v[1] = s->num[0];
        s->n = 2;
        s->want = PGRES_TUPLES_OK;
        s->what = "deleting a client";
        s->sql = PG_CLIENT_OF_ID("DELETE FROM clients");
        return;
    case STORE_OP_CLIENT_TOUCH:
        /* A session's end may come after its client was re-created elsewhere: the new
         * client's last_seen is not the old one's to write. */
        snprintf(s->num[0], sizeof(s->num[0]), "%" PRId64, c->last_seen);
        snprintf(s->num[1], sizeof(s->num[1]), "%" PRId64, c->id);
        s->v[0] = c->name;
        s->v[1] = s->num[0];
        s->v[2] = s->num[1];
        s->n = 3;
        s->what = "storing a client's last_seen";
        s->sql = "UPDATE clients SET last_seen = $2 WHERE name = $1 AND "
                 "($3::bigint = 0 OR id = $3::bigint)";
        return;
    }
}

/* The outcome of a statement that succeeded (res is taken): what it returned into op. */
static enum store_result pg_stmt_finish(struct store_op *op, const struct pg_stmt *s,
                                        PGresult *res)
{
    switch (op->kind) {
    case STORE_OP_INSERT:
    case STORE_OP_REPLACE:
        return pg_returned(res, &op->rec);
    case STORE_OP_UPDATE: {
        /* No row: gone. A row that does not fit, or (cannot happen: cur locked it) no
         * updated row beside it: nothing written. */
        enum store_result r = PQntuples(res) != 1                    ? STORE_NOT_FOUND
                              : strcmp(PQgetvalue(res, 0, 13), "t") ? STORE_CONFLICT
                              : PQgetisnull(res, 0, 0)               ? STORE_CONFLICT
                                                                     : STORE_OK;
        if (r == STORE_OK)
            store_pg_read_mapping(res, 0, &op->rec);
        PQclear(res);
        return r;
    }
    case STORE_OP_CLIENT_UPDATE:
    case STORE_OP_CLIENT_DELETE: {
        /* (rows of the name, rows written): none of the name, or one of another id. */
        enum store_result r = PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, 0), "0") == 0
                                  ? STORE_NOT_FOUND
                              : strcmp(PQgetvalue(res, 0, 1), "0") == 0 ? STORE_CONFLICT
                                                                        : STORE_OK;
        PQclear(res);
        return r;
    }
    case STORE_OP_CLIENT_INSERT:
        if (PQntuples(res) == 1)
            op->crec.id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        PQclear(res);
        op->crec.created_at = s->now;
        if (!op->crec.source[0])
            snprintf(op->crec.source, sizeof(op->crec.source), "api");
        return STORE_OK;
    default:
        return pg_changed(res);
    }
}

/* A write made synchronously (start-up, or no loop attached): pg_write's deadline. */
static enum store_result pg_sync_op(struct pg_store *pg, struct store_op *op)
{
    struct pg_stmt s;
    pg_stmt_build(&s, op);
    PGresult *res = NULL;
    enum store_result r = pg_write(pg, s.sql, s.n, s.v, s.want, s.what, &res);
    return r == STORE_OK ? pg_stmt_finish(op, &s, res) : r;
}

/* The synchronous entry points share one op on the heap (a mapping record is ~4 KiB). */
static enum store_result pg_sync_mapping(void *impl, enum store_op_kind kind,
                                         struct mapping_record *rec, int port)
{
    struct store_op *op = calloc(1, sizeof(*op));
    if (!op)
        return STORE_ERR;
    op->kind = kind;
    op->fields = STORE_F_ALL; /* no loop, no other write of this node's in between */
    if (rec)
        op->rec = *rec;
    else
        op->rec.port = port;
    enum store_result r = pg_sync_op(impl, op);
    if (r == STORE_OK && rec && (kind == STORE_OP_INSERT || kind == STORE_OP_REPLACE))
        *rec = op->rec;
    free(op);
    return r;
}

static enum store_result pg_insert(void *impl, struct mapping_record *rec)
{
    return pg_sync_mapping(impl, STORE_OP_INSERT, rec, 0);
}

static enum store_result pg_replace(void *impl, struct mapping_record *rec)
{
    return pg_sync_mapping(impl, STORE_OP_REPLACE, rec, 0);
}

static enum store_result pg_update(void *impl, const struct mapping_record *rec)
{
    struct mapping_record copy = *rec;
    return pg_sync_mapping(impl, STORE_OP_UPDATE, &copy, 0);
}

static enum store_result pg_remove(void *impl, int port)
{
    return pg_sync_mapping(impl, STORE_OP_DELETE, NULL, port);
}

static enum store_result pgc_sync(void *impl, enum store_op_kind kind,
                                  struct client_record *rec)
{
    struct store_op *op = calloc(1, sizeof(*op));
    if (!op)
        return STORE_ERR;
    op->kind = kind;
    op->crec = *rec;
    enum store_result r = pg_sync_op(impl, op);
    if (r == STORE_OK && kind == STORE_OP_CLIENT_INSERT)
        *rec = op->crec;
    free(op);
    return r;
}

static enum store_result pgc_insert(void *impl, struct client_record *rec)
{
    return pgc_sync(impl, STORE_OP_CLIENT_INSERT, rec);
}

static enum store_result pgc_update(void *impl, const struct client_record *rec)
{
    struct client_record copy = *rec;
    return pgc_sync(impl, STORE_OP_CLIENT_UPDATE, &copy);
}

static enum store_result pgc_delete(void *impl, const char *name)
{
    struct client_record rec = {0};
    snprintf(rec.name, sizeof(rec.name), "%s", name);
    return pgc_sync(impl, STORE_OP_CLIENT_DELETE, &rec);
}

static enum store_result pgc_touch(void *impl, const char *name, int64_t last_seen)
{
    struct client_record rec = {0};
    snprintf(rec.name, sizeof(rec.name), "%s", name);
    rec.last_seen = last_seen;
    return pgc_sync(impl, STORE_OP_CLIENT_TOUCH, &rec);
}

/* Copies a text value, cut at a UTF-8 boundary when it would not fit (a hand edit). */
static void pg_copy(char *dst, size_t cap, PGresult *res, int row, int col)
{
    const char *src = PQgetvalue(res, row, col);
    size_t n = (size_t)PQgetlength(res, row, col);
    if (n >= cap) {
        log_warn("store", "column %s is %zu bytes, cut to %zu", PQfname(res, col), n, cap - 1);
        n = cap - 1;
        while (n > 0 && ((unsigned char)src[n] & 0xC0) == 0x80)
            n--;
    }
    memcpy(dst, src, n);
    dst[n] = '\0';
}

void store_pg_read_mapping(PGresult *res, int i, struct mapping_record *rec)
{
    memset(rec, 0, sizeof(*rec));
    rec->id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
    rec->port = atoi(PQgetvalue(res, i, 1));
    pg_copy(rec->target_ip, sizeof(rec->target_ip), res, i, 2);
    rec->target_port = atoi(PQgetvalue(res, i, 3));
    rec->use_tunnel = PQgetvalue(res, i, 4)[0] == 't';
    pg_copy(rec->client, sizeof(rec->client), res, i, 5);
    pg_copy(rec->name, sizeof(rec->name), res, i, 6);
    rec->created_at = strtoll(PQgetvalue(res, i, 7), NULL, 10);
    pg_copy(rec->allow_from, sizeof(rec->allow_from), res, i, 8);
    const char *pp = PQgetvalue(res, i, 9);
    for (int k = 0; k < 3; k++)
        if (strcmp(pp, pg_proxy_names[k]) == 0)
            rec->proxy_protocol = k;
    rec->max_connections = atoi(PQgetvalue(res, i, 10));
    rec->rate_limit = strtoll(PQgetvalue(res, i, 11), NULL, 10);
    rec->enabled = PQgetvalue(res, i, 12)[0] == 't';
}

/* The whole table in one result (at most 65535 rows, one per port); fn runs after the
 * statement is done, so it may write to the store. */
static enum store_result pg_foreach(void *impl, store_foreach_fn fn, void *arg)
{
    PGresult *res = NULL;
    enum store_result r = pg_command(impl, "SELECT " PG_MAP_COLS " FROM mappings ORDER BY port",
                                     0, NULL, PGRES_TUPLES_OK, "reading mappings", &res);
    if (r != STORE_OK)
        return r;
    struct mapping_record *rec = malloc(sizeof(*rec));
    if (!rec) {
        PQclear(res);
        return STORE_ERR;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        store_pg_read_mapping(res, i, rec);
        if (fn(rec, arg) != 0)
            break;
    }
    free(rec);
    PQclear(res);
    return STORE_OK;
}

/* ---- tunnel clients ---- */


void store_pg_read_client(PGresult *res, int i, struct client_record *rec)
{
    memset(rec, 0, sizeof(*rec));
    pg_copy(rec->name, sizeof(rec->name), res, i, 0);
    pg_copy(rec->token_hash, sizeof(rec->token_hash), res, i, 1);
    pg_copy(rec->prev_hash, sizeof(rec->prev_hash), res, i, 2);
    rec->prev_valid_until = strtoll(PQgetvalue(res, i, 3), NULL, 10);
    pg_copy(rec->source, sizeof(rec->source), res, i, 4);
    rec->created_at = strtoll(PQgetvalue(res, i, 5), NULL, 10);
    rec->last_seen = strtoll(PQgetvalue(res, i, 6), NULL, 10);
    rec->id = strtoll(PQgetvalue(res, i, 7), NULL, 10);
}

static enum store_result pgc_get(void *impl, const char *name, struct client_record *rec)
{
    const char *v[1] = {name};
    PGresult *res = NULL;
    enum store_result r = pg_command(impl,
                                     "SELECT " PG_CLIENT_READ_COLS " FROM clients WHERE name = $1",
                                     1, v, PGRES_TUPLES_OK, "reading a client", &res);
    if (r != STORE_OK)
        return r;
    r = PQntuples(res) == 1 ? STORE_OK : STORE_NOT_FOUND;
    if (r == STORE_OK)
        store_pg_read_client(res, 0, rec);
    PQclear(res);
    return r;
}

static enum store_result pgc_foreach(void *impl, store_client_fn fn, void *arg)
{
    PGresult *res = NULL;
    enum store_result r = pg_command(impl,
                                     "SELECT " PG_CLIENT_READ_COLS " FROM clients ORDER BY name", 0,
                                     NULL, PGRES_TUPLES_OK, "reading clients", &res);
    if (r != STORE_OK)
        return r;
    struct client_record rec;
    for (int i = 0; i < PQntuples(res); i++) {
        store_pg_read_client(res, i, &rec);
        if (fn(&rec, arg) != 0)
            break;
    }
    PQclear(res);
    return STORE_OK;
}

static enum store_result pgs_get(void *impl, const char *key, char *value, size_t len)
{
    PGresult *res = NULL;
    const char *vals[] = {key};
    enum store_result r = pg_command(impl, "SELECT value FROM settings WHERE key = $1", 1,
                                     vals, PGRES_TUPLES_OK, "reading a setting", &res);
    if (r != STORE_OK)
        return r;
    r = STORE_NOT_FOUND;
    if (PQntuples(res) > 0) {
        pg_copy(value, len, res, 0, 0);
        r = STORE_OK;
    }
    PQclear(res);
    return r;
}

static enum store_result pgs_put(void *impl, const char *key, const char *value)
{
    const char *vals[] = {key, value};
    return pg_write(impl, "INSERT INTO settings (key, value) VALUES ($1, $2) "
                          "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    2, vals, PGRES_COMMAND_OK, "storing a setting", NULL);
}

/* ---- the write connection on the loop (SPEC §7) ----
 * After store_attach_loop every write goes through here: queued FIFO, one at a time, each
 * as BEGIN, the statement, COMMIT (pg_call says why a transaction), every step sent with
 * libpq's non-blocking API and its answer taken when the socket becomes readable. Nothing
 * waits: a stopped database only means no events, and the head write's deadline (its
 * call + PG_CALL_MS) drops the connection inside the open transaction, so the server
 * rolls it back and a write answered STORE_UNAVAILABLE is never stored after SIGCONT.
 * The ones queued behind it fail at once. Reconnecting is PQconnectStart/PQconnectPoll on
 * socket events, started by the next write once the backoff allows. */

static void pgw_on_sock(evutil_socket_t fd, short what, void *arg);
static void pgw_next(struct pg_store *pg);

static void pgw_free_events(struct pg_store *pg)
{
    if (pg->wsock)
        event_free(pg->wsock);
    if (pg->wflush)
        event_free(pg->wflush);
    pg->wsock = pg->wflush = NULL;
}

/* (Re)arms the deadline of the head write; none while the queue is empty. */
static void pgw_arm(struct pg_store *pg)
{
    struct store_op *head = TAILQ_FIRST(&pg->wqueue);
    if (!head) {
        evtimer_del(pg->wdeadline);
        return;
    }
    int64_t left = head->deadline_ms - pg_now_ms();
    if (left < 0)
        left = 0;
    struct timeval tv = {(time_t)(left / 1000), (suseconds_t)(left % 1000) * 1000};
    evtimer_add(pg->wdeadline, &tv);
}

/* Completes the head write with r and goes on with the next one. */
static void pgw_complete_head(struct pg_store *pg, enum store_result r)
{
    struct store_op *op = TAILQ_FIRST(&pg->wqueue);
    TAILQ_REMOVE(&pg->wqueue, op, link);
    PQclear(pg->wgot);
    PQclear(pg->wres);
    pg->wgot = pg->wres = NULL;
    free(pg->wstmt);
    pg->wstmt = NULL;
    if (pg->wstate == PGW_BUSY)
        pg->wstate = PGW_IDLE;
    /* The caller may submit again from here; the queue and state are consistent. */
    op->complete(op, r);
    pgw_arm(pg);
    pgw_next(pg);
}

/* True while the head write's COMMIT is sent and unanswered: from then on no one can take
 * it back (the server commits what it has read, whatever becomes of the connection; a
 * commit waiting for a synchronous standby stays committed locally), so a write ended
 * now may be stored. Ask before pgw_drop, which forgets the step. */
static bool pgw_commit_in_flight(const struct pg_store *pg)
{
    return pg->wstate == PGW_BUSY && pg->wstep == PGW_END && pg->wstmt_ok && pg->wstmt &&
           pg->wsent;
}

/* Every queued write answers STORE_UNAVAILABLE (connection gone, shutdown); the head
 * answers STORE_UNCONFIRMED instead when its COMMIT was in flight (pgw_commit_in_flight,
 * asked before the connection was dropped). */
static void pgw_fail_all(struct pg_store *pg, bool head_commit_in_flight)
{
    if (head_commit_in_flight && !TAILQ_EMPTY(&pg->wqueue))
        pgw_complete_head(pg, STORE_UNCONFIRMED);
    while (!TAILQ_EMPTY(&pg->wqueue))
        pgw_complete_head(pg, STORE_UNAVAILABLE);
}

/* Drops the write connection; an open transaction dies with it (rolled back). */
static void pgw_drop(struct pg_store *pg)
{
    pg_dial_cancel(pg->wdial);
    pg->wdial = NULL;
    pgw_free_events(pg);
    if (pg->wconn)
        PQfinish(pg->wconn);
    pg->wconn = NULL;
    pg->wstate = PGW_DOWN;
}

/* The connection failed or gave no answer: drop it, back off, fail what waits. why says
 * what went wrong, or NULL for the connection's own error message. */
static void pgw_lost_why(struct pg_store *pg, const char *what, const char *why, bool backoff)
{
    char msg[256];
    pg_one_line(msg, sizeof(msg), why ? why : pg->wconn ? PQerrorMessage(pg->wconn) : "");
    bool in_flight = pgw_commit_in_flight(pg);
    log_warn("store", "%s: %s%s%s; dropping the write connection%s", pg->where, what,
             msg[0] ? ": " : "", msg,
             in_flight ? " (a COMMIT was on its way: that write may be stored)" : "");
    pgw_drop(pg);
    if (backoff)
        pg_backoff(pg);
    pgw_fail_all(pg, in_flight);
}

static void pgw_lost(struct pg_store *pg, const char *what, bool backoff)
{
    pgw_lost_why(pg, what, NULL, backoff);
}

static void pgw_flush(struct pg_store *pg)
{
    int f = PQflush(pg->wconn);
    if (f < 0)
        pgw_lost(pg, "sending a write failed", true);
    else if (f == 1)
        event_add(pg->wflush, NULL);
}

static void pgw_on_flush(evutil_socket_t fd, short what, void *arg)
{
    struct pg_store *pg = arg;
    /* PQflush may need to read first (the server talking back while we send). */
    if (!PQconsumeInput(pg->wconn)) {
        pgw_lost(pg, "reading from the database failed", true);
        return;
    }
    pgw_flush(pg);
}

static void pgw_send(struct pg_store *pg, const char *sql, int n, const char *const *vals)
{
    pg->wsent = false;
    if (!PQsendQueryParams(pg->wconn, sql, n, NULL, vals, NULL, NULL, 0)) {
        pgw_lost(pg, "sending a write failed", true);
        return;
    }
    pg->wsent = true;
    pgw_flush(pg);
}

/* Starts the head write when the connection is idle. */
static void pgw_next(struct pg_store *pg)
{
    if (pg->wstate != PGW_IDLE || TAILQ_EMPTY(&pg->wqueue))
        return;
    pg->wstate = PGW_BUSY;
    pg->wstep = PGW_BEGIN;
    pgw_send(pg, "BEGIN", 0, NULL);
}

/* One step answered (res: its first result, taken; NULL when it gave none). */
static void pgw_step_done(struct pg_store *pg, PGresult *res)
{
    struct store_op *op = TAILQ_FIRST(&pg->wqueue);
    if (pg->wstep == PGW_BEGIN) {
        if (!pg_command_ok(res)) {
            /* Answered, but refused: the write's own error; the connection stays. */
            enum store_result r = pg_check(pg, res, false, PGRES_COMMAND_OK, "BEGIN");
            PQclear(res);
            pgw_complete_head(pg, r == STORE_OK ? STORE_ERR : r);
            return;
        }
        PQclear(res);
        pg->wstmt = malloc(sizeof(*pg->wstmt));
        if (!pg->wstmt) {
            pg->wstep = PGW_END;
            pg->wstmt_ok = false;
            pgw_send(pg, "ROLLBACK", 0, NULL);
            return;
        }
        pg_stmt_build(pg->wstmt, op);
        pg->wstep = PGW_STMT;
        pgw_send(pg, pg->wstmt->sql, pg->wstmt->n, pg->wstmt->v);
        return;
    }
    if (pg->wstep == PGW_STMT) {
        ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
        pg->wres = res;
        pg->wstmt_ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
        pg->wstep = PGW_END;
        pgw_send(pg, pg->wstmt_ok ? "COMMIT" : "ROLLBACK", 0, NULL);
        return;
    }
    /* End step: the outcome. */
    enum store_result r;
    if (!pg->wstmt) {
        r = STORE_ERR; /* out of memory before the statement */
        PQclear(res);
    } else if (pg->wstmt_ok && !pg_command_ok(res)) {
        /* The commit failed: its error is the write's outcome. */
        r = pg_check(pg, res, false, PGRES_COMMAND_OK, "COMMIT");
        if (r == STORE_OK)
            r = STORE_ERR;
        PQclear(res);
    } else {
        PQclear(res);
        r = pg_check(pg, pg->wres, false, pg->wstmt->want, pg->wstmt->what);
        if (r == STORE_OK) {
            PGresult *taken = pg->wres;
            pg->wres = NULL;
            r = pg_stmt_finish(op, pg->wstmt, taken);
        }
    }
    pgw_complete_head(pg, r);
}

static void pgw_on_read(struct pg_store *pg)
{
    if (!PQconsumeInput(pg->wconn)) {
        /* Idle: the server closed it (restart, terminated); the next write reconnects. */
        pgw_lost(pg, "the database closed the write connection", pg->wstate == PGW_BUSY);
        return;
    }
    while (pg->wstate == PGW_BUSY && !PQisBusy(pg->wconn)) {
        PGresult *r = PQgetResult(pg->wconn);
        if (r) {
            /* One statement gives one result; keep the first, free anything after. */
            if (pg->wgot)
                PQclear(r);
            else
                pg->wgot = r;
            continue;
        }
        PGresult *got = pg->wgot;
        pg->wgot = NULL;
        pgw_step_done(pg, got);
    }
    if (pg->wconn && PQstatus(pg->wconn) == CONNECTION_BAD)
        pgw_lost(pg, "the write connection broke", true);
}

/* Connected: from now on the socket is watched for answers (and an idle close). */
static void pgw_ready(struct pg_store *pg)
{
    pgw_free_events(pg);
    PQsetNoticeProcessor(pg->wconn, store_pg_notice, NULL);
    if (PQsetnonblocking(pg->wconn, 1) != 0) {
        pgw_lost(pg, "switching to non-blocking failed", true);
        return;
    }
    evutil_socket_t fd = PQsocket(pg->wconn);
    pg->wsock = event_new(pg->base, fd, EV_READ | EV_PERSIST, pgw_on_sock, pg);
    pg->wflush = event_new(pg->base, fd, EV_WRITE, pgw_on_flush, pg);
    if (!pg->wsock || !pg->wflush || event_add(pg->wsock, NULL) != 0) {
        pgw_lost(pg, "cannot watch the write connection", true);
        return;
    }
    pg->wstate = PGW_IDLE;
    pgw_next(pg);
}

/* Waits for the socket as PQconnectPoll asked (the socket may change between steps). */
static void pgw_connect_wait(struct pg_store *pg, PostgresPollingStatusType st)
{
    pgw_free_events(pg);
    short what = st == PGRES_POLLING_READING ? EV_READ : EV_WRITE;
    pg->wsock = event_new(pg->base, PQsocket(pg->wconn), what, pgw_on_sock, pg);
    if (!pg->wsock || event_add(pg->wsock, NULL) != 0)
        pgw_lost(pg, "cannot watch the write connection", true);
}

static void pgw_connect_step(struct pg_store *pg)
{
    PostgresPollingStatusType st = PQconnectPoll(pg->wconn);
    if (st == PGRES_POLLING_OK) {
        pg->backoff_s = 0;
        pg->retry_at = 0;
        log_info("store", "%s: write connection up", pg->where);
        pgw_ready(pg);
    } else if (st == PGRES_POLLING_FAILED) {
        pgw_lost(pg, "reconnect failed", true);
    } else {
        pgw_connect_wait(pg, st);
    }
}

static void pgw_on_sock(evutil_socket_t fd, short what, void *arg)
{
    struct pg_store *pg = arg;
    if (pg->wstate == PGW_CONNECTING)
        pgw_connect_step(pg);
    else
        pgw_on_read(pg);
}

static void pgw_on_dialled(PGconn *conn, const char *err, void *arg)
{
    struct pg_store *pg = arg;
    pg->wdial = NULL;
    pg->wconn = conn;
    if (!conn) {
        pgw_lost_why(pg, "reconnect failed", err, true);
        return;
    }
    if (PQstatus(conn) == CONNECTION_BAD) {
        pgw_lost(pg, "reconnect failed", true);
        return;
    }
    pgw_connect_wait(pg, PGRES_POLLING_WRITING);
}

/* Host names are resolved with evdns first (pg_dial): PQconnectStart's own getaddrinfo
 * would hold the loop for as long as DNS takes. The head write's deadline covers both. */
static void pgw_connect(struct pg_store *pg)
{
    pg->wstate = PGW_CONNECTING;
    pg->wdial = pg_dial_start(pg->base, pg->dns, pg->conninfo, "portmux-store",
                              pgw_on_dialled, pg);
    if (!pg->wdial)
        pgw_lost_why(pg, "reconnect failed", "out of memory", true);
}

static void pgw_on_deadline(evutil_socket_t fd, short what, void *arg)
{
    struct pg_store *pg = arg;
    struct store_op *head = TAILQ_FIRST(&pg->wqueue);
    if (!head)
        return;
    if (head->deadline_ms > pg_now_ms()) {
        pgw_arm(pg); /* woke early (timer granularity) */
        return;
    }
    if (pgw_commit_in_flight(pg)) {
        /* The head says it may be stored; the rest changed nothing. */
        log_warn("store", "%s: a COMMIT got no answer within %d ms: that write may be "
                          "stored; dropping the write connection", pg->where, PG_CALL_MS);
        pgw_drop(pg);
        pg_backoff(pg);
        pgw_fail_all(pg, true);
        return;
    }
    log_warn("store", "%s: a write got no answer within %d ms", pg->where, PG_CALL_MS);
    pgw_lost(pg, pg->wstate == PGW_CONNECTING ? "connecting timed out" : "write timed out",
             true);
}

static void pgw_submit(void *impl, struct store_op *op)
{
    struct pg_store *pg = impl;
    op->deadline_ms = pg_now_ms() + PG_CALL_MS;
    if (pg->wstate == PGW_DOWN && time(NULL) < pg->retry_at) {
        /* Backing off: answer now rather than let the caller wait for nothing. */
        op->complete(op, STORE_UNAVAILABLE);
        return;
    }
    TAILQ_INSERT_TAIL(&pg->wqueue, op, link);
    if (TAILQ_FIRST(&pg->wqueue) == op)
        pgw_arm(pg);
    if (pg->wstate == PGW_DOWN)
        pgw_connect(pg);
    else
        pgw_next(pg);
}

static int pgw_attach(void *impl, struct event_base *base, struct evdns_base *dns)
{
    struct pg_store *pg = impl;
    if (pg->base)
        return 0;
    pg->wdeadline = evtimer_new(base, pgw_on_deadline, pg);
    if (!pg->wdeadline)
        return -1;
    pg->base = base;
    pg->dns = dns;
    /* The open connection becomes the write connection: it is idle and proven. */
    if (pg->conn && pg_alive(pg->conn)) {
        pg->wconn = pg->conn;
        pg->conn = NULL;
        pgw_ready(pg);
    }
    return 0;
}

static void pgw_fail_pending(void *impl)
{
    struct pg_store *pg = impl;
    /* A write in progress must not commit after it was answered STORE_UNAVAILABLE; one
     * whose COMMIT is already sent may have, and is answered so. */
    bool in_flight = pgw_commit_in_flight(pg);
    if (!TAILQ_EMPTY(&pg->wqueue) || pg->wstate == PGW_BUSY)
        pgw_drop(pg);
    pgw_fail_all(pg, in_flight);
}

static void pgw_close(struct pg_store *pg)
{
    if (!pg->base)
        return;
    pgw_fail_pending(pg);
    pgw_drop(pg);
    event_free(pg->wdeadline);
    pg->wdeadline = NULL;
    pg->base = NULL;
}

const struct store_backend store_backend_pg = {
    .name = "postgres",
    .open = pg_open,
    .close = pg_close,
    .insert = pg_insert,
    .replace = pg_replace,
    .update = pg_update,
    .remove = pg_remove,
    .foreach = pg_foreach,
    .client_insert = pgc_insert,
    .client_update = pgc_update,
    .client_touch = pgc_touch,
    .client_delete = pgc_delete,
    .client_get = pgc_get,
    .client_foreach = pgc_foreach,
    .setting_get = pgs_get,
    .setting_put = pgs_put,
    .attach = pgw_attach,
    .submit = pgw_submit,
    .fail_pending = pgw_fail_pending,
};

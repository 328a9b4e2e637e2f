/* SQLite backend of the store: opening, the migrations runner, and the mapping statements.
 * All statements are prepared once at open; every SQLite error is logged here. */
#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "embed.h"
#include "log.h"
#include "store.h"
#include "store_backend.h"

extern const struct embedded_file embedded_migrations[];
extern const size_t embedded_migrations_count;

/* Opening and migrating (nothing is served yet) may wait this long for a second process
 * (sqlite3 shell, backup) holding the lock for a moment. */
#define SQ_BUSY_MS 5000
/* Every later write runs on the event loop: each relay, tunnel and API request waits
 * while it does. A lock held longer than this is a write the database cannot take now
 * (STORE_UNAVAILABLE, 503), not a frozen server. */
#define SQ_LOOP_BUSY_MS 200
/* foreach reads this many rows at a time, so callbacks run with no statement open. */
#define SQ_PAGE_ROWS 64

enum sq_stmt_id {
    SQ_INSERT, SQ_DELETE, SQ_PAGE, SQ_BEGIN, SQ_COMMIT, SQ_ROLLBACK, SQ_UPDATE, SQ_COUNT
};

/* The policy columns' text for proxy_protocol, by record value. */
static const char *const sq_proxy_names[] = {"none", "v1", "v2"};

static const char *const sq_sql[SQ_COUNT] = {
    [SQ_INSERT] = "INSERT INTO mappings (port, target_ip, target_port, use_tunnel, client, "
                  "name, created_at, allow_from, proxy_protocol, max_connections, "
                  "rate_limit, enabled) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, "
                  "?11, ?12)",
    [SQ_DELETE] = "DELETE FROM mappings WHERE port = ?1",
    [SQ_PAGE] = "SELECT id, port, target_ip, target_port, use_tunnel, client, name, "
                "created_at, allow_from, proxy_protocol, max_connections, rate_limit, "
                "enabled FROM mappings WHERE port > ?1 ORDER BY port LIMIT ?2",
    [SQ_BEGIN] = "BEGIN IMMEDIATE",
    [SQ_COMMIT] = "COMMIT",
    [SQ_ROLLBACK] = "ROLLBACK",
    /* Same parameter numbers as SQ_INSERT, so one binder serves both (?7 unused). */
    [SQ_UPDATE] = "UPDATE mappings SET target_ip = ?2, target_port = ?3, use_tunnel = ?4, "
                  "client = ?5, name = ?6, allow_from = ?8, proxy_protocol = ?9, "
                  "max_connections = ?10, rate_limit = ?11, enabled = ?12 WHERE port = ?1",
};

/* Tunnel client statements (migration 0002), kept apart from the mapping ones. */
enum sq_client_stmt_id {
    SQC_INSERT, SQC_UPDATE, SQC_DELETE, SQC_TOUCH, SQC_GET, SQC_PAGE, SQC_COUNT
};

static const char *const sqc_sql[SQC_COUNT] = {
    [SQC_INSERT] = "INSERT INTO clients (name, token_hash, prev_hash, prev_valid_until, "
                   "source, created_at, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    [SQC_UPDATE] = "UPDATE clients SET token_hash = ?2, prev_hash = ?3, prev_valid_until = ?4, "
                   "last_seen = ?5 WHERE name = ?1",
    [SQC_DELETE] = "DELETE FROM clients WHERE name = ?1",
    [SQC_TOUCH] = "UPDATE clients SET last_seen = ?2 WHERE name = ?1",
    [SQC_GET] = "SELECT name, token_hash, prev_hash, prev_valid_until, source, created_at, "
                "last_seen, id FROM clients WHERE name = ?1",
    [SQC_PAGE] = "SELECT name, token_hash, prev_hash, prev_valid_until, source, created_at, "
                 "last_seen, id FROM clients WHERE name > ?1 ORDER BY name LIMIT ?2",
};

struct sq_store {
    sqlite3 *db;
    char *path;
    int lock_fd;                  /* flock'd "<path>.lock": one server per database */
    sqlite3_stmt *stmt[SQ_COUNT];
    sqlite3_stmt *cstmt[SQC_COUNT];
};

static void sq_log(struct sq_store *sq, const char *what)
{
    log_error("store", "%s: %s (%s, code %d)", what, sqlite3_errmsg(sq->db), sq->path,
              sqlite3_extended_errcode(sq->db));
}

/* Logs the connection's last error and puts the same line in err, for open's caller. */
static void sq_open_error(struct sq_store *sq, const char *what, char *err, size_t errlen)
{
    sq_log(sq, what);
    store_set_err(err, errlen, "database %s: %s: %s", sq->path, what,
                  sq->db ? sqlite3_errmsg(sq->db) : "out of memory");
}

/* ---- opening ---------------------------------------------------------------------------- */

/* Creates every missing directory above path, as mkdir -p does; the ones it creates are
 * the server's alone (0700): the database lists every target and client. */
static int sq_make_parent_dirs(const char *path, char *err, size_t errlen)
{
    const char *slash = strrchr(path, '/');
    if (!slash || slash == path)
        return 0; /* in the working directory or in /: nothing to create */
    char *dir = strndup(path, (size_t)(slash - path));
    if (!dir) {
        store_set_err(err, errlen, "out of memory");
        return -1;
    }
    int rc = 0;
    for (char *p = dir + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char c = *p;
        *p = '\0';
        if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
            store_set_err(err, errlen, "cannot create directory %s: %s", dir, strerror(errno));
            rc = -1;
            break;
        }
        *p = c;
        if (c == '\0')
            break;
    }
    struct stat sb;
    /* mkdir's EEXIST also covers a file in the way; say so instead of SQLite's vaguer error. */
    if (rc == 0 && (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))) {
        store_set_err(err, errlen, "%s is not a directory", dir);
        rc = -1;
    }
    if (rc != 0)
        log_error("store", "%s", err ? err : "cannot create database directory");
    free(dir);
    return rc;
}

/* One server per database: a second portmux-server on the same file would restore the
 * same mappings, fight over their ports and write behind the first one's back. An
 * exclusive flock on "<path>.lock", taken before SQLite opens (or migrates) anything, is
 * released by the kernel however the holder dies, so kill -9 never leaves a stale lock. */
static int sq_lock(struct sq_store *sq, char *err, size_t errlen)
{
    if (strcmp(sq->path, ":memory:") == 0)
        return 0; /* private to this connection anyway */
    /* Named after the file itself: a second server given a symlink (or another path)
     * to the same database must meet the same lock. */
    char *real = realpath(sq->path, NULL);
    char *lock = NULL;
    int n = asprintf(&lock, "%s.lock", real ? real : sq->path);
    free(real);
    if (n < 0) {
        store_set_err(err, errlen, "out of memory");
        return -1;
    }
    int rc = -1;
    sq->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (sq->lock_fd < 0) {
        store_set_err(err, errlen, "database %s: cannot open the lock file %s: %s", sq->path,
                      lock, strerror(errno));
    } else if (flock(sq->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK)
            store_set_err(err, errlen,
                          "database %s is in use by another portmux-server (%s is locked); "
                          "one server per database", sq->path, lock);
        else
            store_set_err(err, errlen, "database %s: cannot lock %s: %s", sq->path, lock,
                          strerror(errno));
    } else {
        rc = 0;
    }
    if (rc != 0)
        log_error("store", "%s", err ? err : "cannot lock the database");
    free(lock);
    return rc;
}

/* Checks the embedded migrations (a build mistake must not reach a user's database) and
 * returns the newest version in *newest; 0 when there are none. */
static int sq_newest_migration(int *newest, char *err, size_t errlen)
{
    int prev = 0;
    for (size_t i = 0; i < embedded_migrations_count; i++) {
        const struct embedded_file *m = &embedded_migrations[i];
        int v = store_migration_version(m->path);
        if (v <= prev) {
            store_set_err(err, errlen, "embedded migration %s: bad or repeated version",
                          m->path);
            log_error("store", "%s", err ? err : "bad embedded migration");
            return -1;
        }
        /* sqlite3_exec stops at a NUL, which would apply half a migration silently. */
        if (memchr(m->data, '\0', m->len) != NULL) {
            store_set_err(err, errlen, "embedded migration %s contains a NUL byte", m->path);
            log_error("store", "%s", err ? err : "bad embedded migration");
            return -1;
        }
        prev = v;
    }
    *newest = prev;
    return 0;
}

static int sq_read_version(struct sq_store *sq, int *version, char *err, size_t errlen)
{
    sqlite3_stmt *stmt = NULL;
    int rc = sqlite3_prepare_v2(sq->db, "PRAGMA user_version", -1, &stmt, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(stmt);
    if (rc != SQLITE_ROW) {
        sq_open_error(sq, "reading the schema version", err, errlen);
        sqlite3_finalize(stmt);
        return -1;
    }
    *version = sqlite3_column_int(stmt, 0);
    sqlite3_finalize(stmt);
    return 0;
}

/* sqlite3_exec for open-time SQL; logs and fills err on failure. */
static int sq_exec(struct sq_store *sq, const char *sql, const char *what, char *err,
                   size_t errlen)
{
    if (sqlite3_exec(sq->db, sql, NULL, NULL, NULL) == SQLITE_OK)
        return 0;
    sq_open_error(sq, what, err, errlen);
    return -1;
}

static int sq_set_pragmas(struct sq_store *sq, char *err, size_t errlen)
{
    sqlite3_stmt *stmt = NULL;
    int rc = sqlite3_prepare_v2(sq->db, "PRAGMA journal_mode=WAL", -1, &stmt, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(stmt);
    if (rc != SQLITE_ROW) {
        sq_open_error(sq, "setting WAL mode", err, errlen);
        sqlite3_finalize(stmt);
        return -1;
    }
    /* Some file systems cannot do WAL and SQLite stays in its old mode: still correct,
     * only slower, so warn rather than refuse to start. */
    const char *mode = (const char *)sqlite3_column_text(stmt, 0);
    if (!mode || strcasecmp(mode, "wal") != 0)
        log_warn("store", "%s: journal mode is %s, not wal", sq->path, mode ? mode : "?");
    sqlite3_finalize(stmt);
    /* FULL: each commit's WAL frames reach the disk before the commit returns, so a
     * mapping is durable when the API answers (SPEC 3). NORMAL synced only at
     * checkpoints: a power cut could take back mappings already answered 201. */
    if (sq_exec(sq, "PRAGMA synchronous=FULL", "setting synchronous", err, errlen) != 0 ||
        sq_exec(sq, "PRAGMA foreign_keys=ON", "enabling foreign keys", err, errlen) != 0)
        return -1;
    return 0;
}

/* Runs one migration's SQL; the caller owns the transaction. */
static int sq_apply_one(struct sq_store *sq, const struct embedded_file *m, char *err,
                        size_t errlen)
{
    char *msg = NULL;
    if (sqlite3_exec(sq->db, (const char *)m->data, NULL, NULL, &msg) == SQLITE_OK)
        return 0;
    log_error("store", "%s: migration %s failed: %s", sq->path, m->path,
              msg ? msg : sqlite3_errmsg(sq->db));
    store_set_err(err, errlen, "database %s: migration %s failed: %s", sq->path, m->path,
                  msg ? msg : sqlite3_errmsg(sq->db));
    sqlite3_free(msg);
    return -1;
}

static void sq_too_new(struct sq_store *sq, int version, int newest, enum store_result *result,
                       char *err, size_t errlen)
{
    store_set_err(err, errlen,
                  "database %s has schema version %d, this portmux knows up to %d; "
                  "refusing to start",
                  sq->path, version, newest);
    log_error("store", "%s", err ? err : "database schema is newer than this portmux");
    *result = STORE_TOO_NEW;
}

/* Applies every pending migration and the new user_version in one transaction, so a
 * failure anywhere leaves the database exactly as it was. */
static int sq_migrate(struct sq_store *sq, int newest, struct store_open_info *info,
                      enum store_result *result, char *err, size_t errlen)
{
    int version, applied = 0;
    if (sq_exec(sq, "BEGIN IMMEDIATE", "starting the migration", err, errlen) != 0)
        return -1;
    /* Read again under the write lock: another portmux may have migrated meanwhile. */
    if (sq_read_version(sq, &version, err, errlen) != 0)
        goto fail;
    if (version > newest) {
        sq_too_new(sq, version, newest, result, err, errlen);
        goto fail;
    }
    for (size_t i = 0; i < embedded_migrations_count; i++) {
        const struct embedded_file *m = &embedded_migrations[i];
        if (store_migration_version(m->path) <= version)
            continue;
        if (sq_apply_one(sq, m, err, errlen) != 0)
            goto fail;
        applied++;
    }
    if (applied > 0) {
        /* PRAGMA takes no parameters; newest is our own integer, not outside input. */
        char sql[64];
        snprintf(sql, sizeof(sql), "PRAGMA user_version = %d", newest);
        if (sq_exec(sq, sql, "setting the schema version", err, errlen) != 0)
            goto fail;
    }
    if (sq_exec(sq, "COMMIT", "committing the migration", err, errlen) != 0)
        goto fail;
    info->schema_version = applied > 0 ? newest : version;
    info->migrations_applied = applied;
    if (applied > 0)
        log_info("store", "%s: applied %d migration(s), schema version %d", sq->path, applied,
                 newest);
    return 0;
fail:
    if (!sqlite3_get_autocommit(sq->db))
        sqlite3_exec(sq->db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

static int sq_prepare_all(struct sq_store *sq, char *err, size_t errlen)
{
    for (int i = 0; i < SQ_COUNT; i++) {
        if (sqlite3_prepare_v3(sq->db, sq_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &sq->stmt[i],
                               NULL) != SQLITE_OK) {
            sq_open_error(sq, "preparing statements", err, errlen);
            return -1;
        }
    }
    for (int i = 0; i < SQC_COUNT; i++) {
        if (sqlite3_prepare_v3(sq->db, sqc_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
                               &sq->cstmt[i], NULL) != SQLITE_OK) {
            sq_open_error(sq, "preparing client statements", err, errlen);
            return -1;
        }
    }
    return 0;
}

static void sq_close(void *impl)
{
    struct sq_store *sq = impl;
    if (!sq)
        return;
    for (int i = 0; i < SQ_COUNT; i++)
        sqlite3_finalize(sq->stmt[i]);
    for (int i = 0; i < SQC_COUNT; i++)
        sqlite3_finalize(sq->cstmt[i]);
    /* The last connection to close checkpoints the WAL into the database and removes it. */
    if (sq->db && sqlite3_close(sq->db) != SQLITE_OK)
        sq_log(sq, "closing");
    /* Released only once the database is closed and checkpointed. */
    if (sq->lock_fd >= 0)
        close(sq->lock_fd);
    free(sq->path);
    free(sq);
}

/* The schema version is read before any pragma: setting WAL mode writes to the file, and a
 * database from a newer portmux must be left byte for byte as it was. */
static void *sq_open(const char *location, struct store_open_info *info,
                     enum store_result *result, char *err, size_t errlen)
{
    int newest, version;
    if (sq_newest_migration(&newest, err, errlen) != 0)
        return NULL;
    struct sq_store *sq = calloc(1, sizeof(*sq));
    if (sq)
        sq->lock_fd = -1;
    if (!sq || !(sq->path = strdup(location))) {
        store_set_err(err, errlen, "out of memory");
        goto fail;
    }
    if (sq_make_parent_dirs(location, err, errlen) != 0 || sq_lock(sq, err, errlen) != 0)
        goto fail;
    /* A new database is created 0600 here, whatever the umask: it holds every mapping's
     * target and the clients' token hashes, and SQLite gives its -wal and -shm files the
     * mode of the database file. An existing one keeps the mode its owner gave it. */
    if (strcmp(location, ":memory:") != 0) {
        int fd = open(location, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd >= 0)
            close(fd);
    }
    if (sqlite3_open_v2(location, &sq->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) !=
        SQLITE_OK) {
        sq_open_error(sq, "opening", err, errlen);
        goto fail;
    }
    sqlite3_busy_timeout(sq->db, SQ_BUSY_MS);
    /* SQLite opens a file it may not write read-only without a word; every write would
     * then fail. Said now, while the operator is looking. */
    if (sqlite3_db_readonly(sq->db, "main") == 1) {
        store_set_err(err, errlen, "database %s is read-only to this process (check the "
                                   "owner and mode of the file and its directory)", sq->path);
        log_error("store", "%s", err ? err : "database is read-only");
        goto fail;
    }
    if (sq_read_version(sq, &version, err, errlen) != 0)
        goto fail;
    if (version > newest) {
        sq_too_new(sq, version, newest, result, err, errlen);
        goto fail;
    }
    if (sq_set_pragmas(sq, err, errlen) != 0 ||
        sq_migrate(sq, newest, info, result, err, errlen) != 0 ||
        sq_prepare_all(sq, err, errlen) != 0)
        goto fail;
    sqlite3_busy_timeout(sq->db, SQ_LOOP_BUSY_MS);
    return sq;
fail:
    sq_close(sq);
    return NULL;
}

/* ---- statements ------------------------------------------------------------------------- */

/* True when the database file was deleted, or another file put at its path, while the
 * server runs: SQLite would go on writing into the unlinked file, every write answered
 * 2xx and lost at the next start. Writes are refused instead (503), said once a minute. */
static bool sq_file_moved(struct sq_store *sq)
{
    static time_t said;
    int moved = 0;
    if (sqlite3_file_control(sq->db, "main", SQLITE_FCNTL_HAS_MOVED, &moved) != SQLITE_OK ||
        !moved)
        return false;
    time_t now = time(NULL);
    if (now - said >= 60) {
        said = now;
        log_error("store", "%s was deleted or replaced while the server runs: writes are "
                           "refused until it is restored and the server restarted",
                  sq->path);
    }
    return true;
}

/* Steps a statement that returns no rows, then resets it. Returns SQLITE_DONE or the
 * extended error code; logs any error except `expected`, which the caller turns into a
 * result of its own (a UNIQUE violation is a duplicate, not a failure). */
static int sq_run(struct sq_store *sq, enum sq_stmt_id id, const char *what, int expected)
{
    if (id != SQ_ROLLBACK && sq_file_moved(sq))
        return SQLITE_CANTOPEN; /* sq_failure: unavailable */
    int rc = sqlite3_step(sq->stmt[id]);
    if (rc != SQLITE_DONE) {
        rc = sqlite3_extended_errcode(sq->db);
        if (rc != expected)
            sq_log(sq, what);
    }
    sqlite3_reset(sq->stmt[id]);
    return rc;
}

/* What a failed write reports: another connection holding the database's write lock
 * (a sqlite3 shell left in a transaction, a backup) past the busy timeout is "cannot take
 * the write now, nothing changed" (503 store_unavailable), not an internal error. */
static enum store_result sq_failure(int rc)
{
    /* So is a full disk, an I/O error or a file made read-only meanwhile: the write is
     * refused whole (its transaction rolled back) and can be sent again later. */
    switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_FULL:
    case SQLITE_IOERR:
    case SQLITE_READONLY:
    case SQLITE_CANTOPEN:
        return STORE_UNAVAILABLE;
    default:
        return STORE_ERR;
    }
}


static void sq_rollback(struct sq_store *sq)
{
    /* Some errors (SQLITE_FULL, SQLITE_IOERR…) already rolled the transaction back. */
    if (!sqlite3_get_autocommit(sq->db))
        sq_run(sq, SQ_ROLLBACK, "rollback", 0);
}

static int sq_bind_record(struct sq_store *sq, enum sq_stmt_id id,
                          const struct mapping_record *rec, int64_t created_at)
{
    sqlite3_stmt *s = sq->stmt[id];
    int rc = sqlite3_bind_int(s, 1, rec->port);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(s, 2, rec->target_ip, -1, SQLITE_TRANSIENT);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_int(s, 3, rec->target_port);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_int(s, 4, rec->use_tunnel ? 1 : 0);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(s, 5, rec->client, -1, SQLITE_TRANSIENT);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(s, 6, rec->name, -1, SQLITE_TRANSIENT);
    if (rc == SQLITE_OK && id == SQ_INSERT)
        rc = sqlite3_bind_int64(s, 7, created_at);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(s, 8, rec->allow_from, -1, SQLITE_TRANSIENT);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(s, 9, sq_proxy_names[rec->proxy_protocol], -1, SQLITE_STATIC);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_int(s, 10, rec->max_connections);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_int64(s, 11, rec->rate_limit);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_int(s, 12, rec->enabled ? 1 : 0);
    if (rc != SQLITE_OK)
        sq_log(sq, "binding a mapping");
    return rc;
}

/* Inserts rec; on success returns the new row's id and time without touching rec, so a
 * caller inside a transaction fills rec only once the commit succeeded. */
static enum store_result sq_insert_row(struct sq_store *sq, const struct mapping_record *rec,
                                       int64_t *id, int64_t *created_at)
{
    int64_t now = (int64_t)time(NULL);
    if (sq_bind_record(sq, SQ_INSERT, rec, now) != SQLITE_OK)
        return STORE_ERR;
    int rc = sq_run(sq, SQ_INSERT, "inserting a mapping", SQLITE_CONSTRAINT_UNIQUE);
    if (rc == SQLITE_CONSTRAINT_UNIQUE) {
        log_debug("store", "port %d is already stored", rec->port);
        return STORE_DUPLICATE;
    }
    if (rc != SQLITE_DONE)
        return sq_failure(rc);
    *id = sqlite3_last_insert_rowid(sq->db);
    *created_at = now;
    return STORE_OK;
}

static enum store_result sq_insert(void *impl, struct mapping_record *rec)
{
    int64_t id, created_at;
    enum store_result res = sq_insert_row(impl, rec, &id, &created_at);
    if (res == STORE_OK) {
        rec->id = id;
        rec->created_at = created_at;
    }
    return res;
}

static enum store_result sq_remove(void *impl, int port)
{
    struct sq_store *sq = impl;
    if (sqlite3_bind_int(sq->stmt[SQ_DELETE], 1, port) != SQLITE_OK) {
        sq_log(sq, "binding a port");
        return STORE_ERR;
    }
    int rc = sq_run(sq, SQ_DELETE, "deleting a mapping", 0);
    if (rc != SQLITE_DONE)
        return sq_failure(rc);
    return sqlite3_changes(sq->db) == 0 ? STORE_NOT_FOUND : STORE_OK;
}

static enum store_result sq_update(void *impl, const struct mapping_record *rec)
{
    struct sq_store *sq = impl;
    if (sq_bind_record(sq, SQ_UPDATE, rec, 0) != SQLITE_OK)
        return STORE_ERR;
    int rc = sq_run(sq, SQ_UPDATE, "updating a mapping", 0);
    if (rc != SQLITE_DONE)
        return sq_failure(rc);
    return sqlite3_changes(sq->db) == 0 ? STORE_NOT_FOUND : STORE_OK;
}

static enum store_result sq_replace(void *impl, struct mapping_record *rec)
{
    struct sq_store *sq = impl;
    int64_t id, created_at;
    int rc = sq_run(sq, SQ_BEGIN, "starting a replace", 0);
    if (rc != SQLITE_DONE)
        return sq_failure(rc);
    enum store_result res = sq_remove(sq, rec->port);
    if (res == STORE_OK)
        res = sq_insert_row(sq, rec, &id, &created_at);
    if (res == STORE_OK &&
        (rc = sq_run(sq, SQ_COMMIT, "committing a replace", 0)) != SQLITE_DONE)
        res = sq_failure(rc);
    if (res != STORE_OK) {
        /* A failed COMMIT (SQLITE_BUSY) leaves the transaction open: close it here. */
        sq_rollback(sq);
        return res;
    }
    rec->id = id;
    rec->created_at = created_at;
    return STORE_OK;
}

/* Copies a text column into a fixed buffer. A longer value can only come from editing the
 * database by hand; it is cut at a UTF-8 character boundary and reported. */
static void sq_copy_text(char *dst, size_t cap, sqlite3_stmt *s, int col, int port)
{
    const char *src = (const char *)sqlite3_column_text(s, col);
    size_t n = src ? (size_t)sqlite3_column_bytes(s, col) : 0;
    if (n >= cap) {
        log_warn("store", "port %d: column %s is %zu bytes, cut to %zu", port,
                 sqlite3_column_name(s, col), n, cap - 1);
        n = cap - 1;
        while (n > 0 && ((unsigned char)src[n] & 0xC0) == 0x80)
            n--;
    }
    if (n > 0)
        memcpy(dst, src, n);
    dst[n] = '\0';
}

static void sq_read_row(sqlite3_stmt *s, struct mapping_record *rec)
{
    memset(rec, 0, sizeof(*rec));
    rec->id = sqlite3_column_int64(s, 0);
    rec->port = sqlite3_column_int(s, 1);
    sq_copy_text(rec->target_ip, sizeof(rec->target_ip), s, 2, rec->port);
    rec->target_port = sqlite3_column_int(s, 3);
    rec->use_tunnel = sqlite3_column_int(s, 4) != 0;
    sq_copy_text(rec->client, sizeof(rec->client), s, 5, rec->port);
    sq_copy_text(rec->name, sizeof(rec->name), s, 6, rec->port);
    rec->created_at = sqlite3_column_int64(s, 7);
    sq_copy_text(rec->allow_from, sizeof(rec->allow_from), s, 8, rec->port);
    const char *pp = (const char *)sqlite3_column_text(s, 9);
    for (int i = 0; i < 3; i++)
        if (pp && strcmp(pp, sq_proxy_names[i]) == 0)
            rec->proxy_protocol = i;
    rec->max_connections = sqlite3_column_int(s, 10);
    rec->rate_limit = sqlite3_column_int64(s, 11);
    rec->enabled = sqlite3_column_int(s, 12) != 0;
}

/* Reads up to SQ_PAGE_ROWS mappings with a port above `after`; returns how many, or -1. */
static int sq_read_page(struct sq_store *sq, int after, struct mapping_record *page)
{
    sqlite3_stmt *s = sq->stmt[SQ_PAGE];
    int n = 0, rc = SQLITE_DONE;
    if (sqlite3_bind_int(s, 1, after) != SQLITE_OK ||
        sqlite3_bind_int(s, 2, SQ_PAGE_ROWS) != SQLITE_OK) {
        sq_log(sq, "binding a page");
        return -1;
    }
    while (n < SQ_PAGE_ROWS && (rc = sqlite3_step(s)) == SQLITE_ROW)
        sq_read_row(s, &page[n++]);
    if (n < SQ_PAGE_ROWS && rc != SQLITE_DONE) {
        sq_log(sq, "listing mappings");
        n = -1;
    }
    sqlite3_reset(s);
    return n;
}

/* Pages through the table by port instead of holding one statement open across the
 * callbacks: fn may insert, delete or even list again without disturbing the walk, and no
 * read transaction stays open to hold back WAL checkpoints. */
static enum store_result sq_foreach(void *impl, store_foreach_fn fn, void *arg)
{
    struct sq_store *sq = impl;
    struct mapping_record *page = malloc(SQ_PAGE_ROWS * sizeof(*page));
    enum store_result res = STORE_OK;
    int after = 0;
    if (!page) {
        log_error("store", "listing mappings: out of memory");
        return STORE_ERR;
    }
    for (;;) {
        int n = sq_read_page(sq, after, page);
        if (n < 0) {
            res = STORE_ERR;
            break;
        }
        for (int i = 0; i < n; i++) {
            if (fn(&page[i], arg) != 0)
                goto done;
        }
        if (n < SQ_PAGE_ROWS)
            break;
        after = page[n - 1].port;
    }
done:
    free(page);
    return res;
}

/* ---- tunnel clients --------------------------------------------------------------------- */

/* sq_run for a client statement. */
static int sqc_run(struct sq_store *sq, enum sq_client_stmt_id id, const char *what,
                   int expected)
{
    if (sq_file_moved(sq))
        return SQLITE_CANTOPEN;
    int rc = sqlite3_step(sq->cstmt[id]);
    if (rc != SQLITE_DONE) {
        rc = sqlite3_extended_errcode(sq->db);
        if (rc != expected)
            sq_log(sq, what);
    }
    sqlite3_reset(sq->cstmt[id]);
    return rc;
}

/* Binds the columns INSERT and UPDATE share, name first (?1). */
static int sqc_bind_common(sqlite3_stmt *s, const struct client_record *rec)
{
    int rc = sqlite3_bind_text(s, 1, rec->name, -1, SQLITE_TRANSIENT);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(s, 2, rec->token_hash, -1, SQLITE_TRANSIENT);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(s, 3, rec->prev_hash, -1, SQLITE_TRANSIENT);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_int64(s, 4, rec->prev_valid_until);
    return rc;
}

static enum store_result sqc_insert(void *impl, struct client_record *rec)
{
    struct sq_store *sq = impl;
    sqlite3_stmt *s = sq->cstmt[SQC_INSERT];
    int64_t now = (int64_t)time(NULL);
    int rc = sqc_bind_common(s, rec);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(s, 5, rec->source[0] ? rec->source : "api", -1,
                               SQLITE_TRANSIENT);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_int64(s, 6, now);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_int64(s, 7, rec->last_seen);
    if (rc != SQLITE_OK) {
        sq_log(sq, "binding a client");
        return STORE_ERR;
    }
    rc = sqc_run(sq, SQC_INSERT, "inserting a client", SQLITE_CONSTRAINT_UNIQUE);
    if (rc == SQLITE_CONSTRAINT_UNIQUE)
        return STORE_DUPLICATE;
    if (rc != SQLITE_DONE)
        return sq_failure(rc);
    rec->created_at = now;
    rec->id = sqlite3_last_insert_rowid(sq->db);
    if (!rec->source[0])
        snprintf(rec->source, sizeof(rec->source), "api");
    return STORE_OK;
}

/* One statement is its own transaction in SQLite: the row changes all at once or not. */
static enum store_result sqc_update(void *impl, const struct client_record *rec)
{
    struct sq_store *sq = impl;
    sqlite3_stmt *s = sq->cstmt[SQC_UPDATE];
    int rc = sqc_bind_common(s, rec);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_int64(s, 5, rec->last_seen);
    if (rc != SQLITE_OK) {
        sq_log(sq, "binding a client");
        return STORE_ERR;
    }
    rc = sqc_run(sq, SQC_UPDATE, "updating a client", 0);
    if (rc != SQLITE_DONE)
        return sq_failure(rc);
    return sqlite3_changes(sq->db) == 0 ? STORE_NOT_FOUND : STORE_OK;
}

static enum store_result sqc_delete(void *impl, const char *name)
{
    struct sq_store *sq = impl;
    if (sqlite3_bind_text(sq->cstmt[SQC_DELETE], 1, name, -1, SQLITE_TRANSIENT) != SQLITE_OK) {
        sq_log(sq, "binding a client name");
        return STORE_ERR;
    }
    int rc = sqc_run(sq, SQC_DELETE, "deleting a client", 0);
    if (rc != SQLITE_DONE)
        return sq_failure(rc);
    return sqlite3_changes(sq->db) == 0 ? STORE_NOT_FOUND : STORE_OK;
}

static enum store_result sqc_touch(void *impl, const char *name, int64_t last_seen)
{
    struct sq_store *sq = impl;
    sqlite3_stmt *s = sq->cstmt[SQC_TOUCH];
    if (sqlite3_bind_text(s, 1, name, -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_int64(s, 2, last_seen) != SQLITE_OK) {
        sq_log(sq, "binding a client's last_seen");
        return STORE_ERR;
    }
    int rc = sqc_run(sq, SQC_TOUCH, "storing a client's last_seen", 0);
    if (rc != SQLITE_DONE)
        return sq_failure(rc);
    return sqlite3_changes(sq->db) == 0 ? STORE_NOT_FOUND : STORE_OK;
}

/* Copies a text column; the CHECKs and store.c keep every stored value within cap, so a
 * longer one (a hand edit) is cut rather than overflowing. */
static void sqc_copy(char *dst, size_t cap, sqlite3_stmt *s, int col)
{
    const char *src = (const char *)sqlite3_column_text(s, col);
    snprintf(dst, cap, "%s", src ? src : "");
}

static void sqc_read_row(sqlite3_stmt *s, struct client_record *rec)
{
    memset(rec, 0, sizeof(*rec));
    sqc_copy(rec->name, sizeof(rec->name), s, 0);
    sqc_copy(rec->token_hash, sizeof(rec->token_hash), s, 1);
    sqc_copy(rec->prev_hash, sizeof(rec->prev_hash), s, 2);
    rec->prev_valid_until = sqlite3_column_int64(s, 3);
    sqc_copy(rec->source, sizeof(rec->source), s, 4);
    rec->created_at = sqlite3_column_int64(s, 5);
    rec->last_seen = sqlite3_column_int64(s, 6);
    rec->id = sqlite3_column_int64(s, 7);
}

static enum store_result sqc_get(void *impl, const char *name, struct client_record *rec)
{
    struct sq_store *sq = impl;
    sqlite3_stmt *s = sq->cstmt[SQC_GET];
    if (sqlite3_bind_text(s, 1, name, -1, SQLITE_TRANSIENT) != SQLITE_OK) {
        sq_log(sq, "binding a client name");
        return STORE_ERR;
    }
    enum store_result res = STORE_NOT_FOUND;
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
        sqc_read_row(s, rec);
        res = STORE_OK;
    } else if (rc != SQLITE_DONE) {
        sq_log(sq, "reading a client");
        res = STORE_ERR;
    }
    sqlite3_reset(s);
    return res;
}

/* Pages by name, as sq_foreach pages by port, so fn may write to the store. */
static enum store_result sqc_foreach(void *impl, store_client_fn fn, void *arg)
{
    struct sq_store *sq = impl;
    sqlite3_stmt *s = sq->cstmt[SQC_PAGE];
    struct client_record *page = malloc(SQ_PAGE_ROWS * sizeof(*page));
    char after[STORE_CLIENT_NAME_MAX + 1] = "";
    enum store_result res = STORE_OK;
    if (!page) {
        log_error("store", "listing clients: out of memory");
        return STORE_ERR;
    }
    for (;;) {
        int n = 0, rc = SQLITE_DONE;
        if (sqlite3_bind_text(s, 1, after, -1, SQLITE_TRANSIENT) != SQLITE_OK ||
            sqlite3_bind_int(s, 2, SQ_PAGE_ROWS) != SQLITE_OK) {
            sq_log(sq, "binding a page");
            res = STORE_ERR;
            break;
        }
        while (n < SQ_PAGE_ROWS && (rc = sqlite3_step(s)) == SQLITE_ROW)
            sqc_read_row(s, &page[n++]);
        if (n < SQ_PAGE_ROWS && rc != SQLITE_DONE) {
            sq_log(sq, "listing clients");
            res = STORE_ERR;
        }
        sqlite3_reset(s);
        if (res != STORE_OK)
            break;
        for (int i = 0; i < n; i++) {
            if (fn(&page[i], arg) != 0)
                goto done;
        }
        if (n < SQ_PAGE_ROWS)
            break;
        snprintf(after, sizeof(after), "%s", page[n - 1].name);
    }
done:
    free(page);
    return res;
}

/* Settings are read and written once at start: statements prepared for the call. */
static enum store_result sqs_get(void *impl, const char *key, char *value, size_t len)
{
    struct sq_store *sq = impl;
    sqlite3_stmt *s = NULL;
    enum store_result res = STORE_ERR;
    if (sqlite3_prepare_v2(sq->db, "SELECT value FROM settings WHERE key = ?1", -1, &s,
                           NULL) != SQLITE_OK ||
        sqlite3_bind_text(s, 1, key, -1, SQLITE_TRANSIENT) != SQLITE_OK) {
        sq_log(sq, "reading a setting");
        goto out;
    }
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
        const unsigned char *v = sqlite3_column_text(s, 0);
        snprintf(value, len, "%s", v ? (const char *)v : "");
        res = STORE_OK;
    } else if (rc == SQLITE_DONE) {
        res = STORE_NOT_FOUND;
    } else {
        sq_log(sq, "reading a setting");
    }
out:
    sqlite3_finalize(s);
    return res;
}

static enum store_result sqs_put(void *impl, const char *key, const char *value)
{
    struct sq_store *sq = impl;
    sqlite3_stmt *s = NULL;
    enum store_result res = STORE_ERR;
    if (sqlite3_prepare_v2(sq->db, "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
                           -1, &s, NULL) != SQLITE_OK ||
        sqlite3_bind_text(s, 1, key, -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_text(s, 2, value, -1, SQLITE_TRANSIENT) != SQLITE_OK) {
        sq_log(sq, "storing a setting");
        goto out;
    }
    if (sq_file_moved(sq)) {
        res = STORE_UNAVAILABLE;
        goto out;
    }
    int rc = sqlite3_step(s);
    if (rc == SQLITE_DONE)
        res = STORE_OK;
    else {
        sq_log(sq, "storing a setting");
        res = sq_failure(sqlite3_extended_errcode(sq->db));
    }
out:
    sqlite3_finalize(s);
    return res;
}

const struct store_backend store_backend_sqlite = {
    .name = "sqlite",
    .open = sq_open,
    .close = sq_close,
    .insert = sq_insert,
    .replace = sq_replace,
    .update = sq_update,
    .remove = sq_remove,
    .foreach = sq_foreach,
    .client_insert = sqc_insert,
    .client_update = sqc_update,
    .client_touch = sqc_touch,
    .client_delete = sqc_delete,
    .client_get = sqc_get,
    .client_foreach = sqc_foreach,
    .setting_get = sqs_get,
    .setting_put = sqs_put,
};

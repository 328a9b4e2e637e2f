/* Unit test of the store against real SQLite files in a temporary directory. */
#include <ftw.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "embed.h"
#include "store.h"

extern const struct embedded_file embedded_migrations[];
extern const size_t embedded_migrations_count;

/* The schema version a fresh database reaches: the number of the last migration. */
static int newest_version(void)
{
    return atoi(embedded_migrations[embedded_migrations_count - 1].path);
}

static char tmpdir[64];

/* tmpdir + "/" + rel into buf. */
static const char *tpath(char *buf, size_t cap, const char *rel)
{
    snprintf(buf, cap, "%s/%s", tmpdir, rel);
    return buf;
}

static bool exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

static bool exists_suffix(const char *path, const char *suffix)
{
    char buf[PATH_MAX];
    snprintf(buf, sizeof(buf), "%s%s", path, suffix);
    return exists(buf);
}

/* Whole file into a malloc'd buffer; NULL when unreadable. */
static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    if (!f)
        return NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        rewind(f);
        buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
        if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
            free(buf);
            buf = NULL;
        }
        *len = (size_t)n;
    }
    fclose(f);
    return buf;
}

/* Runs sql on its own connection (as a second process would) and returns column 0 of the
 * first row as text in out; returns the SQLite code. */
static int sql_text(const char *db_path, const char *sql, char *out, size_t cap)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *stmt = NULL;
    out[0] = '\0';
    int rc = sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READWRITE, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v2(db, sql, -1, &stmt, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(stmt);
    if (rc == SQLITE_ROW) {
        const unsigned char *t = sqlite3_column_text(stmt, 0);
        snprintf(out, cap, "%s", t ? (const char *)t : "");
        rc = SQLITE_OK;
    } else if (rc == SQLITE_DONE) {
        rc = SQLITE_OK;
    }
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return rc;
}

static int sql_int(const char *db_path, const char *sql)
{
    char buf[64];
    if (sql_text(db_path, sql, buf, sizeof(buf)) != SQLITE_OK)
        return -1;
    return atoi(buf);
}

static int sql_exec(const char *db_path, const char *sql)
{
    sqlite3 *db = NULL;
    int rc = sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(db, sql, NULL, NULL, NULL);
    sqlite3_close(db);
    return rc;
}

static struct store *open_ok(const char *path)
{
    enum store_result res = STORE_ERR;
    char err[512] = "";
    struct store *st = store_open(path, &res, err, sizeof(err));
    if (!st)
        fprintf(stderr, "open %s failed: %s\n", path, err);
    CHECK(st != NULL);
    CHECK(res == STORE_OK);
    return st;
}

static struct mapping_record rec_make(int port, const char *ip, int target_port, bool tunnel,
                                      const char *client, const char *name)
{
    struct mapping_record r;
    memset(&r, 0, sizeof(r));
    r.port = port;
    snprintf(r.target_ip, sizeof(r.target_ip), "%s", ip);
    r.target_port = target_port;
    r.use_tunnel = tunnel;
    r.enabled = true;
    snprintf(r.client, sizeof(r.client), "%s", client);
    snprintf(r.name, sizeof(r.name), "%s", name);
    return r;
}

static bool rec_equal(const struct mapping_record *a, const struct mapping_record *b)
{
    return a->id == b->id && a->port == b->port && strcmp(a->target_ip, b->target_ip) == 0 &&
           a->target_port == b->target_port && a->use_tunnel == b->use_tunnel &&
           strcmp(a->client, b->client) == 0 && strcmp(a->name, b->name) == 0 &&
           a->created_at == b->created_at && strcmp(a->allow_from, b->allow_from) == 0 &&
           a->proxy_protocol == b->proxy_protocol && a->max_connections == b->max_connections &&
           a->rate_limit == b->rate_limit && a->enabled == b->enabled;
}

/* foreach collector: copies up to cap rows, counts all, stops after `stop_after` if set. */
struct collect {
    struct mapping_record rows[600];
    int n;
    int stop_after;
};

static int collect_fn(const struct mapping_record *rec, void *arg)
{
    struct collect *c = arg;
    if (c->n < (int)(sizeof(c->rows) / sizeof(c->rows[0])))
        c->rows[c->n] = *rec;
    c->n++;
    return c->stop_after > 0 && c->n >= c->stop_after;
}

static struct collect *collect_all(struct store *st)
{
    struct collect *c = calloc(1, sizeof(*c));
    CHECK(store_mapping_foreach(st, collect_fn, c) == STORE_OK);
    return c;
}

static void test_fresh_open(void)
{
    char path[PATH_MAX], buf[64];
    tpath(path, sizeof(path), "fresh.db");
    struct store *st = open_ok(path);
    CHECK(newest_version() >= 2);
    CHECK(store_schema_version(st) == newest_version());
    CHECK(store_migrations_applied(st) == (int)embedded_migrations_count);
    CHECK(sql_int(path, "PRAGMA user_version") == newest_version());
    CHECK(sql_text(path, "PRAGMA journal_mode", buf, sizeof(buf)) == SQLITE_OK);
    CHECK(strcmp(buf, "wal") == 0);
    CHECK(sql_int(path, "SELECT count(*) FROM sqlite_master WHERE name = 'mappings'") == 1);
    struct collect *c = collect_all(st);
    CHECK(c->n == 0);
    free(c);
    store_close(st);
}

static void test_crud(void)
{
    char path[PATH_MAX];
    tpath(path, sizeof(path), "crud.db");
    struct store *st = open_ok(path);
    int64_t before = (int64_t)time(NULL);
    struct mapping_record a = rec_make(3000, "10.0.0.3", 22, false, "default", "c");
    struct mapping_record b = rec_make(1000, "", 80, true, "office", "a");
    struct mapping_record c = rec_make(2000, "::1", 443, false, "default", "b");
    CHECK(store_mapping_insert(st, &a) == STORE_OK);
    CHECK(store_mapping_insert(st, &b) == STORE_OK);
    CHECK(store_mapping_insert(st, &c) == STORE_OK);
    CHECK(a.id > 0 && b.id > 0 && c.id > 0 && a.id != b.id && b.id != c.id);
    CHECK(a.created_at >= before && a.created_at <= (int64_t)time(NULL));
    /* Committed: a second connection sees the rows while the store is still open. */
    CHECK(sql_int(path, "SELECT count(*) FROM mappings") == 3);

    struct mapping_record dup = rec_make(2000, "1.2.3.4", 9, false, "x", "dup");
    dup.id = 77;
    CHECK(store_mapping_insert(st, &dup) == STORE_DUPLICATE);
    CHECK(dup.id == 77); /* untouched on failure */

    struct collect *l = collect_all(st);
    CHECK(l->n == 3);
    CHECK(l->rows[0].port == 1000 && l->rows[1].port == 2000 && l->rows[2].port == 3000);
    CHECK(rec_equal(&l->rows[1], &c)); /* the duplicate changed nothing */
    free(l);

    CHECK(store_mapping_delete(st, 2000) == STORE_OK);
    CHECK(store_mapping_delete(st, 2000) == STORE_NOT_FOUND);
    CHECK(store_mapping_delete(st, 0) == STORE_NOT_FOUND);
    CHECK(store_mapping_delete(st, 70000) == STORE_NOT_FOUND);

    struct mapping_record r = rec_make(1000, "192.168.1.9", 8080, false, "default", "new");
    CHECK(store_mapping_replace(st, &r) == STORE_OK);
    CHECK(r.id > 0 && r.created_at >= before);
    struct mapping_record missing = rec_make(4242, "1.1.1.1", 1, false, "default", "");
    CHECK(store_mapping_replace(st, &missing) == STORE_NOT_FOUND);

    l = collect_all(st);
    CHECK(l->n == 2);
    CHECK(rec_equal(&l->rows[0], &r));
    CHECK(rec_equal(&l->rows[1], &a));
    free(l);

    /* The store is usable after a refused replace: its transaction was rolled back. */
    struct mapping_record d = rec_make(4242, "1.1.1.1", 1, false, "default", "");
    CHECK(store_mapping_insert(st, &d) == STORE_OK);

    struct collect *stop = calloc(1, sizeof(*stop));
    stop->stop_after = 1;
    CHECK(store_mapping_foreach(st, collect_fn, stop) == STORE_OK);
    CHECK(stop->n == 1 && stop->rows[0].port == 1000);
    free(stop);
    store_close(st);
}

/* The policy columns of migration 0003: stored, updated in place (id and created_at kept),
 * and read back after a reopen. */
static void test_policy_update(void)
{
    char path[PATH_MAX];
    tpath(path, sizeof(path), "policy.db");
    struct store *st = open_ok(path);
    struct mapping_record a = rec_make(5000, "10.0.0.5", 22, false, "default", "ssh");
    a.enabled = true;
    snprintf(a.allow_from, sizeof(a.allow_from), "10.0.0.0/8,2001:db8::/32");
    a.proxy_protocol = 2;
    a.max_connections = 10;
    a.rate_limit = 1000000000000LL;
    CHECK(store_mapping_insert(st, &a) == STORE_OK);
    struct mapping_record u = a;
    u.allow_from[0] = '\0';
    u.proxy_protocol = 1;
    u.max_connections = 0;
    u.rate_limit = 0;
    u.enabled = false;
    u.target_port = 2222;
    snprintf(u.name, sizeof(u.name), "renamed");
    CHECK(store_mapping_update(st, &u) == STORE_OK);
    struct mapping_record missing = rec_make(5001, "1.1.1.1", 1, false, "default", "");
    CHECK(store_mapping_update(st, &missing) == STORE_NOT_FOUND);
    struct mapping_record bad = u;
    bad.proxy_protocol = 3;
    CHECK(store_mapping_update(st, &bad) == STORE_ERR);
    bad = u;
    bad.max_connections = STORE_MAX_CONNECTIONS + 1;
    CHECK(store_mapping_update(st, &bad) == STORE_ERR);
    store_close(st);
    st = open_ok(path);
    struct collect *c = collect_all(st);
    CHECK(c->n == 1 && rec_equal(&c->rows[0], &u));
    CHECK(c->n == 1 && c->rows[0].id == a.id && c->rows[0].created_at == a.created_at);
    free(c);
    CHECK(sql_int(path, "SELECT count(*) FROM mappings WHERE proxy_protocol = 'v1' AND "
                        "enabled = 0 AND target_port = 2222") == 1);
    store_close(st);
}

static void test_roundtrip_reopen(void)
{
    char path[PATH_MAX], host[STORE_HOST_MAX + 1];
    tpath(path, sizeof(path), "roundtrip.db");
    /* 255 characters: labels of 63 and dots, the longest DNS name. */
    memset(host, 'h', STORE_HOST_MAX);
    for (int i = 63; i < STORE_HOST_MAX; i += 64)
        host[i] = '.';
    host[STORE_HOST_MAX] = '\0';
    const char *uname = "Caf\xc3\xa9 \xe2\x98\x95 \xe7\xab\xaf\xe5\x8f\xa3 \xf0\x9f\x9a\x80";
    struct mapping_record in[4] = {
        rec_make(1, host, 65535, false, "default", uname),
        rec_make(10022, "2001:db8::1", 22, false, "default", "ssh"),
        rec_make(10023, "127.0.0.1", 6379, true, "default", "redis"),
        rec_make(65535, "", 1, true, "b\xc3\xbcro-7", ""),
    };
    memset(in[1].name, 'n', STORE_NAME_MAX); /* the longest ASCII name */
    in[1].name[STORE_NAME_MAX] = '\0';
    /* The longest name in bytes: 64 four-byte code points fill the buffer exactly. */
    for (int i = 0; i < STORE_NAME_MAX; i++)
        memcpy(in[2].name + 4 * i, "\xf0\x9f\x9a\x80", 4);
    in[2].name[STORE_NAME_BYTES] = '\0';

    struct store *st = open_ok(path);
    /* Inserted out of port order, so the listing order is the store's doing. */
    for (int i = 3; i >= 0; i--)
        CHECK(store_mapping_insert(st, &in[i]) == STORE_OK);
    store_close(st);

    st = open_ok(path);
    CHECK(store_migrations_applied(st) == 0);
    CHECK(store_schema_version(st) == newest_version());
    struct collect *c = collect_all(st);
    CHECK(c->n == 4);
    /* in[] is already in port order. */
    for (int i = 0; i < 4 && i < c->n; i++)
        CHECK(rec_equal(&c->rows[i], &in[i]));
    CHECK(strlen(c->rows[0].target_ip) == STORE_HOST_MAX);
    CHECK(strcmp(c->rows[0].name, uname) == 0);
    CHECK(strlen(c->rows[2].name) == STORE_NAME_BYTES);
    CHECK(c->rows[3].use_tunnel && !c->rows[0].use_tunnel);
    CHECK(strcmp(c->rows[3].client, "b\xc3\xbcro-7") == 0 && c->rows[3].target_ip[0] == 0);
    free(c);
    store_close(st);
    /* A clean close checkpoints and removes the WAL. */
    CHECK(!exists_suffix(path, "-wal"));
}

static void test_too_new(void)
{
    char path[PATH_MAX], err[512] = "";
    size_t len_before = 0, len_after = 0;
    tpath(path, sizeof(path), "future.db");
    CHECK(sql_exec(path, "CREATE TABLE mappings (x); INSERT INTO mappings VALUES (1);"
                         "PRAGMA user_version = 99;") == SQLITE_OK);
    unsigned char *before = slurp(path, &len_before);
    CHECK(before != NULL && len_before > 0);

    enum store_result res = STORE_OK;
    struct store *st = store_open(path, &res, err, sizeof(err));
    CHECK(st == NULL);
    CHECK(res == STORE_TOO_NEW);
    CHECK(strstr(err, "schema version 99") != NULL);
    char knows[64];
    snprintf(knows, sizeof(knows), "knows up to %d", newest_version());
    CHECK(strstr(err, knows) != NULL);
    CHECK(strstr(err, "refusing to start") != NULL);
    CHECK(strstr(err, path) != NULL);

    unsigned char *after = slurp(path, &len_after);
    CHECK(after != NULL && len_after == len_before);
    CHECK(after && before && len_after == len_before &&
          memcmp(before, after, len_before) == 0);
    CHECK(!exists_suffix(path, "-wal"));
    CHECK(!exists_suffix(path, "-shm"));
    CHECK(!exists_suffix(path, "-journal"));
    CHECK(sql_int(path, "PRAGMA user_version") == 99);
    free(before);
    free(after);
    store_close(st); /* NULL: must be harmless */
}

static void test_missing_dir(void)
{
    char path[PATH_MAX], dir[PATH_MAX];
    tpath(dir, sizeof(dir), "a/b/c");
    tpath(path, sizeof(path), "a/b/c/mappings.db");
    CHECK(!exists(dir));
    struct store *st = open_ok(path);
    CHECK(exists(dir));
    CHECK(exists(path));
    store_close(st);
}

/* A migration that fails leaves the database as it was and names the migration. */
static void test_failed_migration(void)
{
    char path[PATH_MAX], err[512] = "";
    tpath(path, sizeof(path), "clash.db");
    CHECK(sql_exec(path, "CREATE TABLE mappings (x); INSERT INTO mappings VALUES (5);") ==
          SQLITE_OK);
    enum store_result res = STORE_OK;
    CHECK(store_open(path, &res, err, sizeof(err)) == NULL);
    CHECK(res == STORE_ERR);
    CHECK(strstr(err, "0001_init.sql") != NULL);
    CHECK(sql_int(path, "PRAGMA user_version") == 0);
    CHECK(sql_int(path, "SELECT x FROM mappings") == 5);
}

static void test_bad_input(void)
{
    char path[PATH_MAX], err[512] = "";
    enum store_result res = STORE_OK;
    /* A PostgreSQL URL goes to that backend (SPEC §7), not to a file named "postgres:";
     * nothing listens on port 1, so the open fails and says why. */
    CHECK(store_open("postgres://u@127.0.0.1:1/portmux", &res, err, sizeof(err)) == NULL);
    CHECK(res == STORE_ERR && strstr(err, "cannot connect") != NULL);
    CHECK(access("postgres:", F_OK) != 0);
    CHECK(store_open(NULL, NULL, NULL, 0) == NULL);
    CHECK(store_open("postgresql://u@127.0.0.1:1/x", NULL, NULL, 0) == NULL);

    /* A regular file where the directory should be. */
    tpath(path, sizeof(path), "plainfile");
    CHECK(sql_exec(path, "CREATE TABLE t (x)") == SQLITE_OK);
    tpath(path, sizeof(path), "plainfile/sub/m.db");
    res = STORE_OK;
    CHECK(store_open(path, &res, err, sizeof(err)) == NULL && res == STORE_ERR);

    /* A file that is not a database is refused, not overwritten. */
    tpath(path, sizeof(path), "garbage.db");
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    for (int i = 0; f && i < 64; i++)
        fputs("this is not an sqlite database at all ", f);
    if (f)
        fclose(f);
    res = STORE_OK;
    CHECK(store_open(path, &res, err, sizeof(err)) == NULL && res == STORE_ERR);

    store_close(NULL);
    CHECK(store_schema_version(NULL) == 0 && store_migrations_applied(NULL) == 0);
    struct mapping_record r = rec_make(10, "1.1.1.1", 10, false, "default", "");
    CHECK(store_mapping_insert(NULL, &r) == STORE_ERR);
    CHECK(store_mapping_replace(NULL, &r) == STORE_ERR);
    CHECK(store_mapping_delete(NULL, 10) == STORE_ERR);
    CHECK(store_mapping_foreach(NULL, collect_fn, NULL) == STORE_ERR);

    tpath(path, sizeof(path), "bad.db");
    struct store *st = open_ok(path);
    CHECK(store_mapping_insert(st, NULL) == STORE_ERR);
    CHECK(store_mapping_foreach(st, NULL, NULL) == STORE_ERR);
    r.port = 0;
    CHECK(store_mapping_insert(st, &r) == STORE_ERR);
    r.port = 65536;
    CHECK(store_mapping_insert(st, &r) == STORE_ERR);
    r.port = 10;
    r.target_port = 0;
    CHECK(store_mapping_insert(st, &r) == STORE_ERR);
    r.target_port = 10;
    memset(r.name, 'x', sizeof(r.name)); /* no terminator */
    CHECK(store_mapping_insert(st, &r) == STORE_ERR);
    struct collect *c = collect_all(st);
    CHECK(c->n == 0);
    free(c);
    store_close(st);
}

/* Deleting from inside foreach: the walk must still see every row exactly once. */
static int delete_fn(const struct mapping_record *rec, void *arg)
{
    void **a = arg;
    struct store *st = a[0];
    int *n = a[1];
    /* Counted only when the delete worked, so the caller's total checks both. */
    if (store_mapping_delete(st, rec->port) == STORE_OK)
        (*n)++;
    return 0;
}

static void test_many_ops_integrity(void)
{
    char path[PATH_MAX], buf[64];
    tpath(path, sizeof(path), "many.db");
    struct store *st = open_ok(path);
    int bad = 0;
    for (int p = 20000; p < 20500; p++) {
        struct mapping_record r = rec_make(p, "10.1.2.3", p, p % 2, "default", "bulk");
        bad += store_mapping_insert(st, &r) != STORE_OK;
    }
    for (int p = 20000; p < 20500; p += 2)
        bad += store_mapping_delete(st, p) != STORE_OK;
    for (int p = 20001; p < 20500; p += 4) {
        struct mapping_record r = rec_make(p, "example.com", 1 + p % 100, true, "x", "swap");
        bad += store_mapping_replace(st, &r) != STORE_OK;
    }
    CHECK(bad == 0);
    struct collect *c = collect_all(st);
    CHECK(c->n == 250);
    int ordered = 1;
    for (int i = 1; i < c->n && i < 600; i++)
        ordered &= c->rows[i - 1].port < c->rows[i].port;
    CHECK(ordered);
    free(c);
    CHECK(sql_text(path, "PRAGMA integrity_check", buf, sizeof(buf)) == SQLITE_OK);
    CHECK(strcmp(buf, "ok") == 0);

    int visited = 0;
    void *args[2] = {st, &visited};
    CHECK(store_mapping_foreach(st, delete_fn, args) == STORE_OK);
    CHECK(visited == 250);
    c = collect_all(st);
    CHECK(c->n == 0);
    free(c);
    store_close(st);
    CHECK(sql_text(path, "PRAGMA integrity_check", buf, sizeof(buf)) == SQLITE_OK);
    CHECK(strcmp(buf, "ok") == 0);
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(path);
}

/* ---- tunnel clients ---- */

static struct client_record client_make(const char *name, char hash_digit)
{
    struct client_record r;
    memset(&r, 0, sizeof(r));
    snprintf(r.name, sizeof(r.name), "%s", name);
    memset(r.token_hash, hash_digit, STORE_HASH_HEX);
    return r;
}

struct client_collect {
    char names[200][STORE_CLIENT_NAME_MAX + 1];
    int n;
    int stop_after;
};

static int client_collect_fn(const struct client_record *rec, void *arg)
{
    struct client_collect *c = arg;
    if (c->n < 200)
        snprintf(c->names[c->n], sizeof(c->names[0]), "%s", rec->name);
    c->n++;
    return c->stop_after > 0 && c->n >= c->stop_after;
}

static void test_clients(void)
{
    char path[PATH_MAX];
    tpath(path, sizeof(path), "clients.db");
    struct store *st = open_ok(path);
    CHECK(sql_int(path, "SELECT count(*) FROM sqlite_master WHERE name = 'clients'") == 1);

    struct client_record a = client_make("office", 'a'), got;
    time_t before = time(NULL);
    CHECK(store_client_insert(st, &a) == STORE_OK);
    CHECK(a.created_at >= before && a.created_at <= time(NULL));
    CHECK(strcmp(a.source, "api") == 0);
    struct client_record dup = client_make("office", 'b');
    CHECK(store_client_insert(st, &dup) == STORE_DUPLICATE);

    CHECK(store_client_get(st, "office", &got) == STORE_OK);
    CHECK(strcmp(got.name, "office") == 0 && strcmp(got.token_hash, a.token_hash) == 0);
    CHECK(got.prev_hash[0] == '\0' && got.prev_valid_until == 0 && got.last_seen == 0);
    CHECK(got.created_at == a.created_at && strcmp(got.source, "api") == 0);
    CHECK(store_client_get(st, "nobody", &got) == STORE_NOT_FOUND);

    /* A rotation: new hash, the old one with its expiry, and last_seen. */
    struct client_record rot = got;
    memcpy(rot.prev_hash, got.token_hash, sizeof(rot.prev_hash));
    memset(rot.token_hash, 'c', STORE_HASH_HEX);
    rot.prev_valid_until = 1700000300;
    rot.last_seen = 1700000000;
    CHECK(store_client_update(st, &rot) == STORE_OK);
    struct client_record missing = client_make("ghost", 'd');
    CHECK(store_client_update(st, &missing) == STORE_NOT_FOUND);
    store_close(st);

    /* Durable: all of it is there after a reopen. */
    st = open_ok(path);
    CHECK(store_client_get(st, "office", &got) == STORE_OK);
    CHECK(strcmp(got.token_hash, rot.token_hash) == 0 &&
          strcmp(got.prev_hash, a.token_hash) == 0);
    CHECK(got.prev_valid_until == 1700000300 && got.last_seen == 1700000000);
    CHECK(got.created_at == a.created_at);

    /* foreach: name order, across pages, may stop early. */
    char name[32];
    for (int i = 149; i >= 0; i--) {
        snprintf(name, sizeof(name), "c%03d", i);
        struct client_record r = client_make(name, 'e');
        CHECK(store_client_insert(st, &r) == STORE_OK);
    }
    struct client_collect *c = calloc(1, sizeof(*c));
    CHECK(store_client_foreach(st, client_collect_fn, c) == STORE_OK);
    CHECK(c->n == 151);
    CHECK(strcmp(c->names[0], "c000") == 0 && strcmp(c->names[149], "c149") == 0 &&
          strcmp(c->names[150], "office") == 0);
    memset(c, 0, sizeof(*c));
    c->stop_after = 3;
    CHECK(store_client_foreach(st, client_collect_fn, c) == STORE_OK && c->n == 3);
    free(c);

    CHECK(store_client_delete(st, "office") == STORE_OK);
    CHECK(store_client_delete(st, "office") == STORE_NOT_FOUND);
    CHECK(store_client_get(st, "office", &got) == STORE_NOT_FOUND);

    /* What the store refuses: bad names, bad hashes, NULLs. */
    struct client_record bad = client_make("b\xc3\xbcro", 'a');
    CHECK(store_client_insert(st, &bad) == STORE_ERR);
    bad = client_make("", 'a');
    CHECK(store_client_insert(st, &bad) == STORE_ERR);
    bad = client_make("ok", 'A'); /* hex is lowercase */
    CHECK(store_client_insert(st, &bad) == STORE_ERR);
    bad = client_make("ok", 'a');
    bad.token_hash[10] = '\0';
    CHECK(store_client_insert(st, &bad) == STORE_ERR);
    bad = client_make("ok", 'a');
    memset(bad.prev_hash, 'f', 10);
    CHECK(store_client_update(st, &bad) == STORE_ERR);
    CHECK(store_client_insert(NULL, &a) == STORE_ERR && store_client_insert(st, NULL) == STORE_ERR);
    CHECK(store_client_get(st, "a b", &got) == STORE_NOT_FOUND);
    CHECK(store_client_delete(st, "a/b") == STORE_NOT_FOUND);
    CHECK(store_client_foreach(st, NULL, NULL) == STORE_ERR);
    CHECK(sql_int(path, "SELECT count(*) FROM clients WHERE name = 'ok'") == 0);
    store_close(st);
}

/* A second open of the same database fails at once and changes nothing; the lock goes
 * with the first store. */
/* Settings: absent until put, then read back (cut to the buffer), replaced, and kept
 * across a reopen. */
static void test_settings(void)
{
    char path[PATH_MAX], v[16];
    tpath(path, sizeof(path), "settings.db");
    struct store *st = open_ok(path);
    CHECK(store_setting_get(st, "first_client", v, sizeof(v)) == STORE_NOT_FOUND);
    CHECK(store_setting_put(st, "first_client", "1") == STORE_OK);
    CHECK(store_setting_get(st, "first_client", v, sizeof(v)) == STORE_OK && strcmp(v, "1") == 0);
    CHECK(store_setting_put(st, "first_client", "a long value") == STORE_OK);
    char small[5];
    CHECK(store_setting_get(st, "first_client", small, sizeof(small)) == STORE_OK &&
          strcmp(small, "a lo") == 0);
    CHECK(store_setting_get(st, "other", v, sizeof(v)) == STORE_NOT_FOUND);
    CHECK(store_setting_put(st, "", "x") == STORE_ERR); /* the key's CHECK */
    store_close(st);
    st = open_ok(path);
    CHECK(store_setting_get(st, "first_client", v, sizeof(v)) == STORE_OK &&
          strcmp(v, "a long value") == 0);
    CHECK(sql_int(path, "SELECT count(*) FROM settings") == 1);
    store_close(st);
}

static void test_single_instance_lock(void)
{
    char path[PATH_MAX], lock[PATH_MAX + 8], err[512] = "";
    tpath(path, sizeof(path), "locked.db");
    snprintf(lock, sizeof(lock), "%s.lock", path);
    struct store *first = open_ok(path);
    struct mapping_record a = rec_make(4000, "10.0.0.4", 22, false, "", "kept");
    CHECK(store_mapping_insert(first, &a) == STORE_OK);
    CHECK(exists(lock));
    enum store_result res = STORE_OK;
    struct store *second = store_open(path, &res, err, sizeof(err));
    CHECK(second == NULL && res == STORE_ERR);
    CHECK(strstr(err, "in use by another portmux-server") != NULL);
    CHECK(strstr(err, lock) != NULL);
    store_close(second);
    struct collect *c = collect_all(first);
    CHECK(c->n == 1 && rec_equal(&c->rows[0], &a));
    free(c);
    store_close(first);
    struct store *again = open_ok(path);
    store_close(again);
}

/* Ids are never handed out twice, not even the newest one after its remove. */
static void test_ids_not_reused(void)
{
    char path[PATH_MAX];
    tpath(path, sizeof(path), "ids.db");
    struct store *st = open_ok(path);
    struct mapping_record a = rec_make(5000, "10.0.0.5", 22, false, "", "a");
    struct mapping_record b = rec_make(5001, "10.0.0.5", 23, false, "", "b");
    CHECK(store_mapping_insert(st, &a) == STORE_OK);
    CHECK(store_mapping_insert(st, &b) == STORE_OK);
    CHECK(store_mapping_delete(st, 5001) == STORE_OK);
    struct mapping_record c = rec_make(5002, "10.0.0.5", 24, false, "", "c");
    CHECK(store_mapping_insert(st, &c) == STORE_OK);
    CHECK(c.id > b.id && b.id > a.id);
    store_close(st);
    /* The high-water mark is on disk, not in the process. */
    st = open_ok(path);
    CHECK(store_mapping_delete(st, 5002) == STORE_OK);
    struct mapping_record d = rec_make(5003, "10.0.0.5", 25, false, "", "d");
    CHECK(store_mapping_insert(st, &d) == STORE_OK);
    CHECK(d.id > c.id);
    store_close(st);
}

/* ---- asynchronous writes on SQLite: done runs before the call returns ---- */

struct async_seen {
    int calls;
    enum store_result r;
    bool had_rec;
    struct mapping_record rec;
    struct client_record crec;
};

static void async_mapping_done(enum store_result r, const struct mapping_record *rec, void *arg)
{
    struct async_seen *s = arg;
    s->calls++;
    s->r = r;
    s->had_rec = rec != NULL;
    if (rec)
        s->rec = *rec;
}

static void async_client_done(enum store_result r, const struct client_record *rec, void *arg)
{
    struct async_seen *s = arg;
    s->calls++;
    s->r = r;
    s->had_rec = rec != NULL;
    if (rec)
        s->crec = *rec;
}

static int hook_calls;
static enum store_result hook_last;
static void async_hook(enum store_result r, void *arg)
{
    hook_calls++;
    hook_last = r;
}

static bool gate_open;
static bool async_gate(void *arg) { return gate_open; }

/* What an update sends to a cluster's database: the parts that changed, the destination's
 * four fields as one part. */
static void test_changed_fields(void)
{
    struct mapping_record a = rec_make(4100, "10.0.0.4", 22, false, "", "x");
    struct mapping_record b = a;
    CHECK(store_mapping_changed_fields(&a, &b) == 0);
    b.target_port = 23;
    CHECK(store_mapping_changed_fields(&a, &b) == STORE_F_DEST);
    b = a;
    b.use_tunnel = true;
    snprintf(b.client, sizeof(b.client), "default");
    CHECK(store_mapping_changed_fields(&a, &b) == STORE_F_DEST);
    b = a;
    snprintf(b.name, sizeof(b.name), "y");
    b.rate_limit = 1000;
    CHECK(store_mapping_changed_fields(&a, &b) == (STORE_F_NAME | STORE_F_RATE_LIMIT));
    b = a;
    snprintf(b.allow_from, sizeof(b.allow_from), "10.0.0.0/8");
    b.proxy_protocol = 2;
    b.max_connections = 5;
    b.enabled = !a.enabled;
    CHECK(store_mapping_changed_fields(&a, &b) ==
          (STORE_F_ALLOW_FROM | STORE_F_PROXY_PROTOCOL | STORE_F_MAX_CONNECTIONS |
           STORE_F_ENABLED));
    /* id and created_at are not parts an update changes. */
    b = a;
    b.id = a.id + 1;
    b.created_at = a.created_at + 1;
    CHECK(store_mapping_changed_fields(&a, &b) == 0);
}

static void test_async_sqlite(void)
{
    char path[PATH_MAX];
    tpath(path, sizeof(path), "async.db");
    struct store *st = open_ok(path);
    /* SQLite has nothing to attach: writes stay synchronous. */
    CHECK(store_attach_loop(st, NULL, NULL) == -1);
    CHECK(!store_writes_async(st));
    store_set_write_hook(st, async_hook, NULL);
    struct async_seen s = {0};
    struct mapping_record a = rec_make(4100, "10.0.0.4", 22, false, "default", "x");
    store_mapping_insert_async(st, &a, async_mapping_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_OK && s.had_rec && s.rec.id > 0 && s.rec.created_at > 0);
    CHECK(s.rec.port == 4100 && strcmp(s.rec.name, "x") == 0);
    CHECK(hook_calls == 1 && hook_last == STORE_OK);
    CHECK(store_write_count(st) == 1);
    memset(&s, 0, sizeof(s));
    store_mapping_insert_async(st, &a, async_mapping_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_DUPLICATE && !s.had_rec);
    CHECK(hook_calls == 2 && hook_last == STORE_DUPLICATE && store_write_count(st) == 1);
    /* The caller's record is a copy: changing it after the call changes nothing. */
    struct mapping_record u = a;
    snprintf(u.name, sizeof(u.name), "renamed");
    memset(&s, 0, sizeof(s));
    store_mapping_update_async(st, &a, &u, 0, async_mapping_done, &s);
    memset(&u, 0, sizeof(u));
    CHECK(s.calls == 1 && s.r == STORE_OK);
    CHECK(sql_int(path, "SELECT count(*) FROM mappings WHERE name = 'renamed'") == 1);
    memset(&s, 0, sizeof(s));
    store_mapping_replace_async(st, &a, async_mapping_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_OK && s.had_rec && s.rec.id > 0);
    /* Refused arguments answer through done too, at once. */
    memset(&s, 0, sizeof(s));
    struct mapping_record bad = a;
    bad.port = 0;
    store_mapping_insert_async(st, &bad, async_mapping_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_ERR);
    memset(&s, 0, sizeof(s));
    store_mapping_delete_async(st, 70000, async_mapping_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_NOT_FOUND);
    /* The gate answers STORE_UNAVAILABLE without touching the database. */
    store_set_gate(st, async_gate, NULL);
    gate_open = false;
    memset(&s, 0, sizeof(s));
    store_mapping_delete_async(st, 4100, async_mapping_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_UNAVAILABLE);
    CHECK(sql_int(path, "SELECT count(*) FROM mappings WHERE port = 4100") == 1);
    gate_open = true;
    memset(&s, 0, sizeof(s));
    store_mapping_delete_async(st, 4100, async_mapping_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_OK && !s.had_rec);
    CHECK(sql_int(path, "SELECT count(*) FROM mappings WHERE port = 4100") == 0);
    /* Clients; done may be NULL (nobody waits: last_seen). */
    struct client_record c = client_make("edge", 'c');
    memset(&s, 0, sizeof(s));
    store_client_insert_async(st, &c, async_client_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_OK && s.had_rec && s.crec.created_at > 0);
    CHECK(strcmp(s.crec.source, "api") == 0);
    c.last_seen = 4242;
    store_client_update_async(st, &c, NULL, NULL);
    CHECK(sql_int(path, "SELECT last_seen FROM clients WHERE name = 'edge'") == 4242);
    /* A touch writes last_seen and nothing else: the hashes stay as the row has them. */
    struct client_record other = client_make("edge", 'd');
    store_client_update_async(st, &other, NULL, NULL);
    memset(&s, 0, sizeof(s));
    store_client_touch_async(st, "edge", 0, 5151, async_client_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_OK && !s.had_rec);
    CHECK(sql_int(path, "SELECT last_seen FROM clients WHERE name = 'edge'") == 5151);
    struct client_record got;
    CHECK(store_client_get(st, "edge", &got) == STORE_OK);
    CHECK(strcmp(got.token_hash, other.token_hash) == 0);
    memset(&s, 0, sizeof(s));
    store_client_touch_async(st, "nobody", 0, 1, async_client_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_NOT_FOUND);
    memset(&s, 0, sizeof(s));
    store_client_delete_async(st, "a/b", 0, async_client_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_NOT_FOUND);
    memset(&s, 0, sizeof(s));
    store_client_delete_async(st, "edge", 0, async_client_done, &s);
    CHECK(s.calls == 1 && s.r == STORE_OK && !s.had_rec);
    store_fail_pending(st); /* nothing queued: a no-op */
    store_close(st);
}

int main(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/portmux-store-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_fresh_open();
    test_crud();
    test_roundtrip_reopen();
    test_policy_update();
    test_too_new();
    test_missing_dir();
    test_failed_migration();
    test_bad_input();
    test_many_ops_integrity();
    test_clients();
    test_settings();
    test_single_instance_lock();
    test_ids_not_reused();
    test_changed_fields();
    test_async_sqlite();
    nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return check_summary();
}

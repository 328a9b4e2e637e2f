/* The store front: argument checks and dispatch to the backend chosen by the location. */
#include "store.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "store_backend.h"

struct store {
    const struct store_backend *backend;
    void *impl;
    struct store_open_info info;
    uint64_t writes;  /* successful writes, for store_write_count */
    bool (*gate)(void *arg); /* store_set_gate */
    void *gate_arg;
    bool attached;    /* store_attach_loop succeeded: the backend's submit takes writes */
    void (*hook)(enum store_result r, void *arg); /* store_set_write_hook */
    void *hook_arg;
};

void store_set_gate(struct store *st, bool (*ok)(void *arg), void *arg)
{
    if (!st)
        return;
    st->gate = ok;
    st->gate_arg = arg;
}

/* True when a write must not even be tried: the database is known to be away. */
static bool store_gated(const struct store *st)
{
    return st->gate && !st->gate(st->gate_arg);
}

int store_migration_version(const char *name)
{
    int v = 0;
    const char *p = name;
    for (; *p >= '0' && *p <= '9'; p++) {
        if (v > 100000000)
            return -1;
        v = v * 10 + (*p - '0');
    }
    return (p == name || *p != '_') ? -1 : v;
}

void store_set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void store_set_result(enum store_result *result, enum store_result value)
{
    if (result)
        *result = value;
}

static bool store_is_postgres(const char *location)
{
    /* Both spellings libpq accepts, so a user's connection string is recognised as such
     * instead of becoming a file named "postgres:". */
    return strncmp(location, "postgres://", 11) == 0 ||
           strncmp(location, "postgresql://", 13) == 0;
}

struct store *store_open(const char *location, enum store_result *result, char *err,
                         size_t errlen)
{
    store_set_result(result, STORE_ERR);
    store_set_err(err, errlen, "unknown error");
    if (!location || !*location) {
        store_set_err(err, errlen, "no database location given");
        return NULL;
    }
    struct store *st = calloc(1, sizeof(*st));
    if (!st) {
        store_set_err(err, errlen, "out of memory");
        return NULL;
    }
    /* The backend always gets somewhere to write its result, even when the caller gave none. */
    enum store_result res = STORE_ERR;
    st->backend = store_is_postgres(location) ? &store_backend_pg : &store_backend_sqlite;
    st->impl = st->backend->open(location, &st->info, &res, err, errlen);
    if (!st->impl) {
        store_set_result(result, res);
        free(st);
        return NULL;
    }
    store_set_result(result, STORE_OK);
    store_set_err(err, errlen, "%s", "");
    return st;
}

void store_close(struct store *st)
{
    if (!st)
        return;
    st->backend->close(st->impl);
    free(st);
}

int store_schema_version(struct store *st)
{
    return st ? st->info.schema_version : 0;
}

int store_migrations_applied(struct store *st)
{
    return st ? st->info.migrations_applied : 0;
}

/* True when s is NUL-terminated inside its buffer of size cap. */
static bool store_str_ok(const char *s, size_t cap)
{
    return memchr(s, '\0', cap) != NULL;
}

/* The rules every backend relies on, checked once here: a record that fails them is a bug
 * in the caller, so it is logged rather than silently stored or truncated. */
static bool store_record_ok(const struct mapping_record *rec)
{
    if (!rec)
        return false;
    if (rec->port < 1 || rec->port > 65535 || rec->target_port < 1 ||
        rec->target_port > 65535) {
        log_error("store", "refusing mapping with port %d target_port %d", rec->port,
                  rec->target_port);
        return false;
    }
    if (!store_str_ok(rec->target_ip, sizeof(rec->target_ip)) ||
        !store_str_ok(rec->client, sizeof(rec->client)) ||
        !store_str_ok(rec->name, sizeof(rec->name)) ||
        !store_str_ok(rec->allow_from, sizeof(rec->allow_from))) {
        log_error("store", "refusing mapping on port %d: unterminated string", rec->port);
        return false;
    }
    if (rec->proxy_protocol < 0 || rec->proxy_protocol > 2 || rec->max_connections < 0 ||
        rec->max_connections > STORE_MAX_CONNECTIONS || rec->rate_limit < 0 ||
        rec->rate_limit > STORE_RATE_LIMIT_MAX) {
        log_error("store", "refusing mapping on port %d: policy out of range", rec->port);
        return false;
    }
    return true;
}

/* Counts a successful mapping write (store_write_count). */
static enum store_result store_count(struct store *st, enum store_result r)
{
    if (r == STORE_OK)
        st->writes++;
    return r;
}

uint64_t store_write_count(const struct store *st)
{
    return st ? st->writes : 0;
}

bool store_is_shared(const struct store *st)
{
    return st && st->backend == &store_backend_pg;
}

enum store_result store_mapping_insert(struct store *st, struct mapping_record *rec)
{
    if (!st || !store_record_ok(rec))
        return STORE_ERR;
    if (store_gated(st))
        return STORE_UNAVAILABLE;
    return store_count(st, st->backend->insert(st->impl, rec));
}

enum store_result store_mapping_replace(struct store *st, struct mapping_record *rec)
{
    if (!st || !store_record_ok(rec))
        return STORE_ERR;
    if (store_gated(st))
        return STORE_UNAVAILABLE;
    return store_count(st, st->backend->replace(st->impl, rec));
}

enum store_result store_mapping_update(struct store *st, const struct mapping_record *rec)
{
    if (!st || !store_record_ok(rec))
        return STORE_ERR;
    if (store_gated(st))
        return STORE_UNAVAILABLE;
    return store_count(st, st->backend->update(st->impl, rec));
}

enum store_result store_mapping_delete(struct store *st, int port)
{
    if (!st)
        return STORE_ERR;
    /* No row can hold such a port (the schema CHECKs it), so there is nothing to delete. */
    if (port < 1 || port > 65535)
        return STORE_NOT_FOUND;
    if (store_gated(st))
        return STORE_UNAVAILABLE;
    return store_count(st, st->backend->remove(st->impl, port));
}

enum store_result store_mapping_foreach(struct store *st,
                                        int (*fn)(const struct mapping_record *rec, void *arg),
                                        void *arg)
{
    if (!st || !fn)
        return STORE_ERR;
    return st->backend->foreach(st->impl, fn, arg);
}

/* ---- tunnel clients ---- */

/* Names and hashes come from the client registry, which validated them; anything else is
 * a bug above the store, refused here like a bad mapping. */
static bool store_client_name_ok(const char *name)
{
    if (!name)
        return false;
    size_t n = strnlen(name, STORE_CLIENT_NAME_MAX + 1);
    if (n == 0 || n > STORE_CLIENT_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

static bool store_hash_ok(const char *hex, bool may_be_empty)
{
    size_t n = strnlen(hex, STORE_HASH_HEX + 1);
    if (n == 0)
        return may_be_empty;
    if (n != STORE_HASH_HEX)
        return false;
    for (size_t i = 0; i < n; i++) {
        if (!((hex[i] >= '0' && hex[i] <= '9') || (hex[i] >= 'a' && hex[i] <= 'f')))
            return false;
    }
    return true;
}

static bool store_client_ok(const struct client_record *rec)
{
    if (!rec || !store_str_ok(rec->name, sizeof(rec->name)) ||
        !store_str_ok(rec->source, sizeof(rec->source)) || !store_client_name_ok(rec->name) ||
        !store_hash_ok(rec->token_hash, false) || !store_hash_ok(rec->prev_hash, true)) {
        log_error("store", "refusing a malformed client record");
        return false;
    }
    return true;
}

enum store_result store_client_insert(struct store *st, struct client_record *rec)
{
    if (!st || !store_client_ok(rec))
        return STORE_ERR;
    if (store_gated(st))
        return STORE_UNAVAILABLE;
    return store_count(st, st->backend->client_insert(st->impl, rec));
}

enum store_result store_client_update(struct store *st, const struct client_record *rec)
{
    if (!st || !store_client_ok(rec))
        return STORE_ERR;
    if (store_gated(st))
        return STORE_UNAVAILABLE;
    return store_count(st, st->backend->client_update(st->impl, rec));
}

enum store_result store_client_delete(struct store *st, const char *name)
{
    if (!st)
        return STORE_ERR;
    if (!store_client_name_ok(name))
        return STORE_NOT_FOUND; /* no row can hold such a name */
    if (store_gated(st))
        return STORE_UNAVAILABLE;
    return store_count(st, st->backend->client_delete(st->impl, name));
}

enum store_result store_client_get(struct store *st, const char *name,
                                   struct client_record *rec)
{
    if (!st || !rec)
        return STORE_ERR;
    if (!store_client_name_ok(name))
        return STORE_NOT_FOUND;
    return st->backend->client_get(st->impl, name, rec);
}

enum store_result store_client_foreach(struct store *st,
                                       int (*fn)(const struct client_record *rec, void *arg),
                                       void *arg)
{
    if (!st || !fn)
        return STORE_ERR;
    return st->backend->client_foreach(st->impl, fn, arg);
}


enum store_result store_setting_get(struct store *st, const char *key, char *value,
                                    size_t len)
{
    if (!st || !key || !value || len == 0)
        return STORE_ERR;
    return st->backend->setting_get(st->impl, key, value, len);
}

enum store_result store_setting_put(struct store *st, const char *key, const char *value)
{
    if (!st || !key || !value)
        return STORE_ERR;
    if (store_gated(st))
        return STORE_UNAVAILABLE;
    return store_count(st, st->backend->setting_put(st->impl, key, value));
}

/* ---- asynchronous writes ---- */

int store_attach_loop(struct store *st, struct event_base *base, struct evdns_base *dns)
{
    if (!st || !base)
        return -1;
    if (!st->backend->attach)
        return 0; /* SQLite: writes stay synchronous by design (store.h) */
    if (st->backend->attach(st->impl, base, dns) != 0)
        return -1;
    st->attached = true;
    return 0;
}

void store_set_write_hook(struct store *st, void (*fn)(enum store_result r, void *arg),
                          void *arg)
{
    if (!st)
        return;
    st->hook = fn;
    st->hook_arg = arg;
}

bool store_writes_async(const struct store *st)
{
    return st && st->attached;
}

void store_fail_pending(struct store *st)
{
    if (st && st->attached && st->backend->fail_pending)
        st->backend->fail_pending(st->impl);
}

static bool store_op_is_client(enum store_op_kind k)
{
    return k == STORE_OP_CLIENT_INSERT || k == STORE_OP_CLIENT_UPDATE ||
           k == STORE_OP_CLIENT_DELETE || k == STORE_OP_CLIENT_TOUCH;
}

/* The backend is done with op: count it, tell the caller, free it. */
static void store_op_complete(struct store_op *op, enum store_result r)
{
    struct store *st = op->st;
    store_count(st, r);
    bool filled = r == STORE_OK && op->kind != STORE_OP_DELETE &&
                  op->kind != STORE_OP_CLIENT_DELETE && op->kind != STORE_OP_CLIENT_TOUCH;
    if (store_op_is_client(op->kind) && op->client_done)
        op->client_done(r, filled ? &op->crec : NULL, op->arg);
    else if (!store_op_is_client(op->kind) && op->mapping_done)
        op->mapping_done(r, filled ? &op->rec : NULL, op->arg);
    free(op);
    if (st->hook)
        st->hook(r, st->hook_arg);
}

/* Without a loop (SQLite, tests, start-up) the write runs here, synchronously. */
static enum store_result store_op_run(struct store *st, struct store_op *op)
{
    const struct store_backend *b = st->backend;
    switch (op->kind) {
    case STORE_OP_INSERT:
        return b->insert(st->impl, &op->rec);
    case STORE_OP_REPLACE:
        return b->replace(st->impl, &op->rec);
    case STORE_OP_UPDATE:
        return b->update(st->impl, &op->rec);
    case STORE_OP_DELETE:
        return b->remove(st->impl, op->rec.port);
    case STORE_OP_CLIENT_INSERT:
        return b->client_insert(st->impl, &op->crec);
    case STORE_OP_CLIENT_UPDATE:
        return b->client_update(st->impl, &op->crec);
    case STORE_OP_CLIENT_DELETE:
        return b->client_delete(st->impl, op->crec.name);
    case STORE_OP_CLIENT_TOUCH:
        return b->client_touch(st->impl, op->crec.name, op->crec.last_seen);
    }
    return STORE_ERR;
}

static void store_submit(struct store *st, struct store_op *op)
{
    op->st = st;
    op->complete = store_op_complete;
    if (store_gated(st)) {
        store_op_complete(op, STORE_UNAVAILABLE);
        return;
    }
    if (st->attached && st->backend->submit) {
        st->backend->submit(st->impl, op);
        return;
    }
    store_op_complete(op, store_op_run(st, op));
}

/* A new op, or NULL after answering done itself (bad arguments, out of memory). */
static struct store_op *store_op_new(enum store_op_kind kind, bool ok,
                                     enum store_result refusal,
                                     store_mapping_done_fn mdone, store_client_done_fn cdone,
                                     void *arg)
{
    struct store_op *op = ok ? calloc(1, sizeof(*op)) : NULL;
    if (!op) {
        enum store_result r = ok ? STORE_ERR : refusal;
        if (mdone)
            mdone(r, NULL, arg);
        else if (cdone)
            cdone(r, NULL, arg);
        return NULL;
    }
    op->kind = kind;
    op->mapping_done = mdone;
    op->client_done = cdone;
    op->arg = arg;
    return op;
}

static void store_mapping_async(struct store *st, enum store_op_kind kind,
                                const struct mapping_record *rec, store_mapping_done_fn done,
                                void *arg)
{
    struct store_op *op =
        store_op_new(kind, st && store_record_ok(rec), STORE_ERR, done, NULL, arg);
    if (!op)
        return;
    op->rec = *rec;
    store_submit(st, op);
}

void store_mapping_insert_async(struct store *st, const struct mapping_record *rec,
                                store_mapping_done_fn done, void *arg)
{
    store_mapping_async(st, STORE_OP_INSERT, rec, done, arg);
}

void store_mapping_replace_async(struct store *st, const struct mapping_record *rec,
                                 store_mapping_done_fn done, void *arg)
{
    store_mapping_async(st, STORE_OP_REPLACE, rec, done, arg);
}

unsigned store_mapping_changed_fields(const struct mapping_record *a,
                                      const struct mapping_record *b)
{
    unsigned f = 0;
    if (strcmp(a->target_ip, b->target_ip) != 0 || a->target_port != b->target_port ||
        a->use_tunnel != b->use_tunnel || strcmp(a->client, b->client) != 0)
        f |= STORE_F_DEST;
    if (strcmp(a->name, b->name) != 0)
        f |= STORE_F_NAME;
    if (strcmp(a->allow_from, b->allow_from) != 0)
        f |= STORE_F_ALLOW_FROM;
    if (a->proxy_protocol != b->proxy_protocol)
        f |= STORE_F_PROXY_PROTOCOL;
    if (a->max_connections != b->max_connections)
        f |= STORE_F_MAX_CONNECTIONS;
    if (a->rate_limit != b->rate_limit)
        f |= STORE_F_RATE_LIMIT;
    if (a->enabled != b->enabled)
        f |= STORE_F_ENABLED;
    return f;
}

void store_mapping_update_async(struct store *st, const struct mapping_record *base,
                                const struct mapping_record *rec, unsigned named,
                                store_mapping_done_fn done, void *arg)
{
    struct store_op *op =
        store_op_new(STORE_OP_UPDATE, st && store_record_ok(rec), STORE_ERR, done, NULL, arg);
    if (!op)
        return;
    op->rec = *rec;
    op->fields = base ? (store_mapping_changed_fields(base, rec) | named) & STORE_F_ALL
                      : STORE_F_ALL;
    if (base) {
        op->base = *base;
        op->has_base = true;
    }
    store_submit(st, op);
}

void store_mapping_delete_async(struct store *st, int port, store_mapping_done_fn done,
                                void *arg)
{
    /* As store_mapping_delete: no row can hold such a port. */
    bool valid = port >= 1 && port <= 65535;
    struct store_op *op = store_op_new(STORE_OP_DELETE, st && valid,
                                       st ? STORE_NOT_FOUND : STORE_ERR, done, NULL, arg);
    if (!op)
        return;
    op->rec.port = port;
    store_submit(st, op);
}

void store_client_insert_async(struct store *st, const struct client_record *rec,
                               store_client_done_fn done, void *arg)
{
    struct store_op *op = store_op_new(STORE_OP_CLIENT_INSERT, st && store_client_ok(rec),
                                       STORE_ERR, NULL, done, arg);
    if (!op)
        return;
    op->crec = *rec;
    store_submit(st, op);
}

void store_client_update_async(struct store *st, const struct client_record *rec,
                               store_client_done_fn done, void *arg)
{
    struct store_op *op = store_op_new(STORE_OP_CLIENT_UPDATE, st && store_client_ok(rec),
                                       STORE_ERR, NULL, done, arg);
    if (!op)
        return;
    op->crec = *rec;
    store_submit(st, op);
}

/* A write of the client called name, of that id; NULL after answering done (no such name
 * can be stored: STORE_NOT_FOUND; out of memory). The caller fills the rest, submits. */
static struct store_op *store_client_op(struct store *st, enum store_op_kind kind,
                                        const char *name, int64_t id,
                                        store_client_done_fn done, void *arg)
{
    bool valid = store_client_name_ok(name);
    struct store_op *op = store_op_new(kind, st && valid, st ? STORE_NOT_FOUND : STORE_ERR,
                                       NULL, done, arg);
    if (op) {
        snprintf(op->crec.name, sizeof(op->crec.name), "%s", name);
        op->crec.id = id;
    }
    return op;
}

void store_client_delete_async(struct store *st, const char *name, int64_t id,
                               store_client_done_fn done, void *arg)
{
    struct store_op *op = store_client_op(st, STORE_OP_CLIENT_DELETE, name, id, done, arg);
    if (op)
        store_submit(st, op);
}

void store_client_touch_async(struct store *st, const char *name, int64_t id,
                              int64_t last_seen, store_client_done_fn done, void *arg)
{
    struct store_op *op = store_client_op(st, STORE_OP_CLIENT_TOUCH, name, id, done, arg);
    if (!op)
        return;
    op->crec.last_seen = last_seen;
    store_submit(st, op);
}

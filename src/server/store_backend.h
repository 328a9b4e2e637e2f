/* Private to the store: the table of functions a storage backend provides. store.c checks
 * arguments once and dispatches here, so each backend only does its own I/O. */
#ifndef PORTMUX_STORE_BACKEND_H
#define PORTMUX_STORE_BACKEND_H

#include <stddef.h>
#include <sys/queue.h>

#include "store_types.h"

struct event_base;
struct evdns_base;

/* What a backend reports about the schema once it is open. */
struct store_open_info {
    int schema_version;     /* version after migrations */
    int migrations_applied; /* how many this open applied */
};

/* One asynchronous write (store.h's *_async), owned by store.c from submit to complete.
 * The records are copies, so the caller need not keep its own alive. */
enum store_op_kind {
    STORE_OP_INSERT, STORE_OP_REPLACE, STORE_OP_UPDATE, STORE_OP_DELETE,
    STORE_OP_CLIENT_INSERT, STORE_OP_CLIENT_UPDATE, STORE_OP_CLIENT_DELETE,
    STORE_OP_CLIENT_TOUCH, /* crec.name and crec.last_seen only */
};

struct store_op {
    enum store_op_kind kind;
    struct mapping_record rec;    /* INSERT, REPLACE, UPDATE (DELETE: rec.port); filled */
    struct client_record crec;    /* CLIENT_*: CLIENT_DELETE uses crec.name and crec.id */
    /* UPDATE: the parts of rec to store (enum store_field); the row must still be rec.id's,
     * and with has_base its destination still base's when the destination is to change.
     * A backend may write the rest too when no other writer can exist. */
    unsigned fields;
    bool has_base;
    struct mapping_record base;
    /* Set by store.c: the backend calls it exactly once, then never touches op again. */
    void (*complete)(struct store_op *op, enum store_result r);
    /* Free for the backend while it holds op. */
    TAILQ_ENTRY(store_op) link;
    int64_t deadline_ms;
    /* store.c's own: the caller's callback. */
    struct store *st;
    void (*mapping_done)(enum store_result r, const struct mapping_record *rec, void *arg);
    void (*client_done)(enum store_result r, const struct client_record *rec, void *arg);
    void *arg;
};

typedef int (*store_foreach_fn)(const struct mapping_record *rec, void *arg);
typedef int (*store_client_fn)(const struct client_record *rec, void *arg);

struct store_backend {
    const char *name;
    /* Returns the backend's handle, or NULL with *result and err set. */
    void *(*open)(const char *location, struct store_open_info *info,
                  enum store_result *result, char *err, size_t errlen);
    /* Frees the handle. Only called with a handle open returned. */
    void (*close)(void *impl);
    enum store_result (*insert)(void *impl, struct mapping_record *rec);
    enum store_result (*replace)(void *impl, struct mapping_record *rec);
    enum store_result (*update)(void *impl, const struct mapping_record *rec);
    enum store_result (*remove)(void *impl, int port);
    enum store_result (*foreach)(void *impl, store_foreach_fn fn, void *arg);
    /* Tunnel clients; names and hashes were checked by store.c. */
    enum store_result (*client_insert)(void *impl, struct client_record *rec);
    enum store_result (*client_update)(void *impl, const struct client_record *rec);
    enum store_result (*client_delete)(void *impl, const char *name);
    /* last_seen alone: a node's copy of the hashes may be older than the row's (another
     * node rotated), and must never be written back by a session's start or end. */
    enum store_result (*client_touch)(void *impl, const char *name, int64_t last_seen);
    enum store_result (*client_get)(void *impl, const char *name, struct client_record *rec);
    enum store_result (*client_foreach)(void *impl, store_client_fn fn, void *arg);
    /* The settings table (migration 0005): read into value (len bytes), and insert or
     * replace. Start-up only. */
    enum store_result (*setting_get)(void *impl, const char *key, char *value, size_t len);
    enum store_result (*setting_put)(void *impl, const char *key, const char *value);
    /* Optional (NULL: store.c runs the synchronous function above and completes at once).
     * attach starts the backend's own writes on base, resolving names with dns (0, or -1
     * when it cannot); submit
     * queues op and completes it later from the loop, or at once when it cannot start;
     * fail_pending completes every queued op with STORE_UNAVAILABLE (shutdown). */
    int (*attach)(void *impl, struct event_base *base, struct evdns_base *dns);
    void (*submit)(void *impl, struct store_op *op);
    void (*fail_pending)(void *impl);
};

extern const struct store_backend store_backend_sqlite;
extern const struct store_backend store_backend_pg;

/* The number before the first '_' of a migration's file name (both backends' migrations
 * are named NNNN_what.sql), or -1 without one. */
int store_migration_version(const char *name);

/* snprintf into err when the caller gave a buffer; err may be NULL or errlen 0. */
void store_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif

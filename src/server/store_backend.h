/* Private to the store: the table of functions a storage backend provides. store.c checks
 * arguments once and dispatches here, so each backend only does its own I/O. */
#ifndef PORTMUX_STORE_BACKEND_H
#define PORTMUX_STORE_BACKEND_H

#include <stddef.h>

#include "store_types.h"

/* What a backend reports about the schema once it is open. */
struct store_open_info {
    int schema_version;     /* version after migrations */
    int migrations_applied; /* how many this open applied */
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
    enum store_result (*client_get)(void *impl, const char *name, struct client_record *rec);
    enum store_result (*client_foreach)(void *impl, store_client_fn fn, void *arg);
};

extern const struct store_backend store_backend_sqlite;
extern const struct store_backend store_backend_pg;

/* snprintf into err when the caller gave a buffer; err may be NULL or errlen 0. */
void store_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif

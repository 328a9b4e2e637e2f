/* Mapping persistence. The server talks to this interface only, so a PostgreSQL backend
 * can sit beside SQLite later (store_open picks the backend from the location string). */
#ifndef PORTMUX_STORE_H
#define PORTMUX_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define STORE_HOST_MAX 255
#define STORE_NAME_MAX 64                    /* characters (UTF-8 code points) */
#define STORE_NAME_BYTES (STORE_NAME_MAX * 4) /* room for 64 code points of UTF-8 */
#define STORE_ALLOW_MAX 64                   /* CIDRs in one mapping's allow_from */
#define STORE_CIDR_TEXT 50                   /* "ffff:...:ffff/128" and its NUL fit */
/* allow_from is stored as its CIDRs joined by ',' (a CIDR never holds one). */
#define STORE_ALLOW_BYTES (STORE_ALLOW_MAX * STORE_CIDR_TEXT)
#define STORE_MAX_CONNECTIONS 1000000
#define STORE_RATE_LIMIT_MAX 1000000000000LL /* bytes/s; 0 = unlimited */

enum store_result {
    STORE_OK = 0,
    STORE_ERR = -1,        /* I/O or database error; details logged */
    STORE_NOT_FOUND = -2,
    STORE_DUPLICATE = -3,  /* port already stored */
    STORE_TOO_NEW = -4,    /* schema is newer than this binary knows */
    STORE_UNAVAILABLE = -5,/* the database did not answer in time (§7); nothing changed */
};

struct mapping_record {
    int64_t id;                           /* assigned by insert */
    int port;
    char target_ip[STORE_HOST_MAX + 1];   /* "" when absent in tunnel mode */
    int target_port;
    bool use_tunnel;
    char client[STORE_NAME_BYTES + 1];    /* tunnel client name */
    char name[STORE_NAME_BYTES + 1];      /* label, may be "", UTF-8 */
    int64_t created_at;                   /* unix seconds, assigned by insert */
    /* Policy (SPEC §2, migration 0003). */
    char allow_from[STORE_ALLOW_BYTES + 1]; /* CIDRs joined by ','; "" = anyone */
    int proxy_protocol;                   /* 0 none, 1 v1, 2 v2 */
    int max_connections;                  /* 0 = limits.max_connections_per_mapping */
    int64_t rate_limit;                   /* bytes/s per direction; 0 = unlimited */
    bool enabled;
};

struct store;

/* Opens (creating when missing, with parent directory) the store at location: a file path
 * for SQLite. Applies pending migrations in one transaction. On failure returns NULL,
 * *result says why (STORE_TOO_NEW for a newer schema), err holds a one-line message. */
struct store *store_open(const char *location, enum store_result *result, char *err,
                         size_t errlen);

/* Closes the store cleanly. NULL-safe. */
void store_close(struct store *st);

/* The schema version the store is at after open. */
int store_schema_version(struct store *st);

/* How many migrations store_open applied (0 on a second start). */
int store_migrations_applied(struct store *st);

/* How many writes (mappings and clients) this process made through st successfully. The cluster sync (cluster_sync.h) discards a read that a local write may
 * have overtaken. */
uint64_t store_write_count(const struct store *st);

/* Installs ok, asked before every write: false means the database is known to be away
 * (the cluster's change feed saw it stall or drop), and the write answers
 * STORE_UNAVAILABLE at once instead of waiting on the loop for a timeout. */
void store_set_gate(struct store *st, bool (*ok)(void *arg), void *arg);

/* True when st is shared by several nodes (PostgreSQL, SPEC §7). */
bool store_is_shared(const struct store *st);

/* Inserts rec (durable when it returns STORE_OK); fills rec->id and rec->created_at. */
enum store_result store_mapping_insert(struct store *st, struct mapping_record *rec);

/* Replaces the stored mapping on rec->port with rec in one transaction (keeps nothing of
 * the old row); fills rec->id and rec->created_at. STORE_NOT_FOUND when none is stored. */
enum store_result store_mapping_replace(struct store *st, struct mapping_record *rec);

/* Changes every field of the stored mapping on rec->port but id and created_at (one
 * statement, durable when it returns STORE_OK). STORE_NOT_FOUND when none is stored. */
enum store_result store_mapping_update(struct store *st, const struct mapping_record *rec);

/* Deletes the mapping on port. STORE_NOT_FOUND when there is none. */
enum store_result store_mapping_delete(struct store *st, int port);

/* Calls fn for each stored mapping in port order; stops early when fn returns non-zero. */
enum store_result store_mapping_foreach(struct store *st,
                                        int (*fn)(const struct mapping_record *rec, void *arg),
                                        void *arg);

/* ---- tunnel clients (SPEC §4a) ----
 * Only clients created through the API are stored; the store never sees a token, only
 * the hash the client registry (clients.h) computes, as lowercase hex. */

#define STORE_CLIENT_NAME_MAX 64   /* [A-Za-z0-9._-], so bytes = characters */
#define STORE_HASH_HEX 64          /* SHA-256 in hex */

struct client_record {
    char name[STORE_CLIENT_NAME_MAX + 1];
    char token_hash[STORE_HASH_HEX + 1];
    char prev_hash[STORE_HASH_HEX + 1]; /* "" when no rotation is in its grace period */
    int64_t prev_valid_until;           /* unix seconds; prev_hash is accepted before it */
    char source[8];                     /* "api" */
    int64_t created_at;                 /* unix seconds, assigned by insert */
    int64_t last_seen;                  /* unix seconds of the last Hello or session end */
};

/* Inserts rec (durable on STORE_OK); fills rec->created_at. STORE_DUPLICATE when the name
 * is stored already. */
enum store_result store_client_insert(struct store *st, struct client_record *rec);

/* Updates the hashes, grace period and last_seen of the client named rec->name in one
 * transaction. STORE_NOT_FOUND when none is stored. */
enum store_result store_client_update(struct store *st, const struct client_record *rec);

/* Deletes the client named name. STORE_NOT_FOUND when there is none. */
enum store_result store_client_delete(struct store *st, const char *name);

/* Reads the client named name into *rec. STORE_NOT_FOUND when there is none. */
enum store_result store_client_get(struct store *st, const char *name,
                                   struct client_record *rec);

/* Calls fn for each stored client in name order; stops early when fn returns non-zero. */
enum store_result store_client_foreach(struct store *st,
                                       int (*fn)(const struct client_record *rec, void *arg),
                                       void *arg);

#endif

/* The store's types: what a stored mapping and a stored client look like, the limits on
 * their fields, and the result codes. No functions: store.h (the interface the server
 * calls) and store_backend.h (what a backend implements) both include this, so neither
 * includes the other. */
#ifndef PORTMUX_STORE_TYPES_H
#define PORTMUX_STORE_TYPES_H

#include <stdbool.h>
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
    /* The statement succeeded and its COMMIT got no answer in time (§7): the write may be
     * stored (a synchronous standby that is gone, a stalled server that wakes up). The
     * resync after a failed write brings the outcome once the database tells it. */
    STORE_UNCONFIRMED = -6,
    /* The row changed meanwhile in a part this write was made from (another node's
     * write, or the mapping removed and created anew); nothing changed. */
    STORE_CONFLICT = -7,
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

/* The parts of a mapping an update can change, for writes that must not undo a change
 * another node made meanwhile (PostgreSQL, SPEC §7). The destination travels as one part:
 * its fields are checked together (mode, client, loop guard), so two halves of two
 * requests never meet. */
enum store_field {
    STORE_F_DEST = 1u << 0,        /* target_ip, target_port, use_tunnel, client */
    STORE_F_NAME = 1u << 1,
    STORE_F_ALLOW_FROM = 1u << 2,
    STORE_F_PROXY_PROTOCOL = 1u << 3,
    STORE_F_MAX_CONNECTIONS = 1u << 4,
    STORE_F_RATE_LIMIT = 1u << 5,
    STORE_F_ENABLED = 1u << 6,
    STORE_F_ALL = (1u << 7) - 1,
};

/* ---- tunnel clients (SPEC §4a) ---- */

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
    /* Assigned by insert (0: not known). PostgreSQL's come from a sequence and are never
     * reused, so a client removed and created again under its name has another id; the
     * single-node SQLite store may reuse one, and has no other writer to tell apart. */
    int64_t id;
};

#endif

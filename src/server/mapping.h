/* The live registry of mappings: one listener per mapping, its status and counters,
 * create/remove/restore against the store. Owns struct mapping. */
#ifndef PORTMUX_MAPPING_H
#define PORTMUX_MAPPING_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <time.h>

#include <event2/util.h>
#include <jansson.h>
#include <sys/socket.h>

#include "netaddr.h"
#include "store.h"
#include "token_bucket.h"

struct server;
struct mapping;
struct bufferevent_rate_limit_group;

enum mapping_status {
    MAPPING_LISTENING, MAPPING_WAITING_FOR_CLIENT, MAPPING_ERROR, MAPPING_DISABLED
};

struct mapping_stats {
    uint64_t active;
    uint64_t total;
    uint64_t failed;
    uint64_t bytes_in;   /* public client -> target */
    uint64_t bytes_out;  /* target -> public client */
    uint64_t refused_limit;  /* over max_connections */
    uint64_t refused_allow;  /* source not in allow_from */
};

/* One live public connection of a mapping, embedded in whatever carries it (a direct
 * relay or a tunnel stream bridge), so that removing the mapping can close it. */
struct mapping_conn {
    TAILQ_ENTRY(mapping_conn) link;
    struct mapping *mapping;
    /* Closes the connection at once (mapping removed or server stopping). It must end with
     * mapping_conn_end() and free its owner; it is never called after mapping_conn_end. */
    void (*abort)(struct mapping_conn *mc);
    /* Optional, set by the owner after begin: the mapping's policy changed (update), so
     * a connection that holds policy state of its own (a rate-limit group) takes it up. */
    void (*policy_changed)(struct mapping_conn *mc);
    uint64_t bytes_in;                  /* this connection's share of the stats */
    uint64_t bytes_out;
    struct timespec opened;             /* CLOCK_MONOTONIC, for the close log line */
    struct sockaddr_storage peer;       /* the public client (family 0 when unknown) */
};

struct mapping {
    struct mapping_record rec;
    struct server *srv;
    struct evconnlistener *listener;    /* NULL when status is error */
    struct accept_guard *accept_guard;  /* with the listener */
    char error[192];                    /* reason, when the listener could not be bound */
    struct mapping_stats stats;
    /* Policy, parsed from rec by mapping_apply_policy. */
    struct netaddr_cidr allow[STORE_ALLOW_MAX];
    size_t allow_len;                   /* 0 = anyone */
    struct token_bucket bucket[2];      /* rate_limit: [0] public->target, [1] back */
    struct bufferevent_rate_limit_group *rl_group; /* rate_limit for bufferevents */
    const struct sockaddr *accepting;   /* the peer, during the accept callback only */
    time_t refused_log_at;              /* refusal log lines: one per 10 s ... */
    uint64_t refused_log_suppressed;    /* ... and how many were left out */
    TAILQ_HEAD(mapping_conn_list, mapping_conn) conns;
    TAILQ_ENTRY(mapping) link;
};

/* Counts a new connection (active, total) and links it for abort. Inside the mapping's
 * accept callback it also records the peer's address. */
void mapping_conn_begin(struct mapping *m, struct mapping_conn *mc,
                        void (*abort)(struct mapping_conn *mc));
/* Unlinks it; counts it failed when it never reached its target. Logs (debug) its bytes
 * and duration. */
void mapping_conn_end(struct mapping_conn *mc, bool failed);
/* Counts bytes relayed by the connection, into it and its mapping. */
static inline void mapping_conn_add_bytes(struct mapping_conn *mc, uint64_t in, uint64_t out);

static inline void mapping_conn_add_bytes(struct mapping_conn *mc, uint64_t in, uint64_t out)
{
    mc->bytes_in += in;
    mc->bytes_out += out;
    mc->mapping->stats.bytes_in += in;
    mc->mapping->stats.bytes_out += out;
}

/* The mapping's connection limit: rec.max_connections, or the config's default. */
int mapping_max_connections(const struct mapping *m);

/* The PROXY protocol header (rec.proxy_protocol) for connection mc accepted on socket fd
 * (whose local address is the header's destination) into buf of PROXY_HEADER_MAX bytes.
 * Returns its length, 0 when the mapping sends none. */
int mapping_conn_proxy_header(const struct mapping_conn *mc, int fd, unsigned char *buf);

/* Effective target host: rec.target_ip, or 127.0.0.1 in tunnel mode when empty. */
const char *mapping_target_host(const struct mapping *m);

enum mapping_status mapping_status(const struct mapping *m);
const char *mapping_status_name(enum mapping_status s);

/* Registry. */
struct mapping_registry *mapping_registry_new(struct server *srv);
/* Closes every listener and live connection, frees all. NULL-safe. */
void mapping_registry_free(struct mapping_registry *reg);
/* Loads every stored mapping and binds it; a port that cannot be bound stays with status
 * error. Returns 0, or -1 when the store could not be read. */
int mapping_registry_restore(struct mapping_registry *reg);
struct mapping *mapping_registry_find(struct mapping_registry *reg, int port);
size_t mapping_registry_count(struct mapping_registry *reg);
/* Iteration for list and metrics, in port order of creation. */
struct mapping *mapping_registry_first(struct mapping_registry *reg);
struct mapping *mapping_registry_next(struct mapping *m);

enum mapping_result {
    MAPPING_OK = 0,
    MAPPING_E_IN_USE = -1,     /* already mapped, or the OS refused the bind */
    MAPPING_E_STORE = -2,      /* database error */
    MAPPING_E_NOT_FOUND = -3,
    MAPPING_E_EXHAUSTED = -4,  /* port 0 asked for and no port of the range is free */
    MAPPING_E_UNAVAILABLE = -5,/* the database did not answer in time (§7); nothing changed */
};

/* Binds rec.port (rec.port 0: the lowest free port of the range, not blacklisted, not
 * mapped and bindable; MAPPING_E_EXHAUSTED when there is none), then stores rec; on any failure neither remains. A stored mapping on the
 * same port in status error is retried: on a successful bind it is replaced by rec.
 * err gets a human reason on failure. *out is the live mapping on success. */
enum mapping_result mapping_registry_create(struct mapping_registry *reg,
                                            struct mapping_record *rec,
                                            struct mapping **out, char *err, size_t errlen);
/* Changes the mapping on rec->port to rec (every field but id, port and created_at, which
 * are kept): stored first, then applied. The listener stays open through it; enabled
 * false closes it and every live connection, enabled true opens it again (a failed bind
 * of a disabled mapping changes nothing: MAPPING_E_IN_USE). allow_from, max_connections
 * and rate_limit apply to live connections at once. *out is the live mapping. */
enum mapping_result mapping_registry_update(struct mapping_registry *reg,
                                            const struct mapping_record *rec,
                                            struct mapping **out, char *err, size_t errlen);

/* Deletes from the store, closes the listener and every live connection. */
enum mapping_result mapping_registry_remove(struct mapping_registry *reg, int port);

/* SPEC §7: brings the live mapping on rec->port in line with rec, a row another node
 * stored (bind, rebind, policy, enable/disable), without writing to the store. A port
 * that cannot be bound stays with status error. Returns true when anything changed. */
bool mapping_registry_apply(struct mapping_registry *reg, const struct mapping_record *rec);
/* Closes and drops the mapping on port (removed by another node), without the store.
 * Returns true when there was one. */
bool mapping_registry_forget(struct mapping_registry *reg, int port);

/* The mapping as the API shows it (fields, status, error, counters). New reference. */
json_t *mapping_to_json(const struct mapping *m);

#endif

/* The registry's types: one mapping, its counters, one live public connection. Types
 * only, so the policy half of a mapping (mapping_policy.c) reads them without including
 * the registry's functions (mapping.h includes it back). Owned by mapping.c. */
#ifndef PORTMUX_MAPPING_TYPES_H
#define PORTMUX_MAPPING_TYPES_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <time.h>

#include "log_limit.h"
#include "netaddr.h"
#include "store_types.h"
#include "token_bucket.h"

struct server;
struct mapping;
struct mapping_op;
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
    /* Optional, set by the owner after begin: whether a socket nothing reads (its
     * direction waits on a full destination, or had its FIN) is dead (reset). The
     * registry's sweep asks it
     * of a connection that has not moved for MAPPING_STALL_CHECK_S, and aborts the
     * connection when it says so: nothing else would notice such a reset. */
    bool (*unwatched_source_dead)(struct mapping_conn *mc);
    /* Optional: bytes this connection holds in the server's memory for a peer that has
     * not taken them (a tunnel stream's output toward its public socket). The sweep adds
     * them up across the server; see mapping.c, MAPPING_HELD_CLOSE_MIN. */
    size_t (*held_bytes)(struct mapping_conn *mc);
    uint64_t bytes_in;                  /* this connection's share of the stats */
    uint64_t bytes_out;
    /* limits.idle_timeout (mapping_registry's sweep): bytes_in + bytes_out when the sweep
     * last saw them change, and when (CLOCK_MONOTONIC seconds). */
    uint64_t idle_bytes;
    int64_t idle_since;
    struct timespec opened;             /* CLOCK_MONOTONIC, for the close log line */
    struct sockaddr_storage peer;       /* the public client (family 0 when unknown) */
};

struct mapping {
    struct mapping_record rec;
    struct server *srv;
    struct evconnlistener *listener;    /* NULL when status is error */
    struct accept_guard *accept_guard;  /* with the listener */
    struct proxy_waits *proxy_waits;    /* with the listener, made at the first balancer's
                                           connection (trusted_proxies) */
    char error[192];                    /* reason, when the listener could not be bound */
    struct mapping_stats stats;
    /* Policy, parsed from rec by mapping_apply_policy. */
    struct netaddr_cidr allow[STORE_ALLOW_MAX];
    size_t allow_len;                   /* 0 = anyone */
    struct token_bucket bucket[2];      /* rate_limit: [0] public->target, [1] back */
    struct bufferevent_rate_limit_group *rl_group; /* rate_limit for bufferevents */
    const struct sockaddr *accepting;   /* the peer, during the accept callback only */
    struct log_limit refused_log;       /* refusal log lines: one per 10 s */
    struct {                            /* failed dials (mapping_dial_failed) */
        char last_error[200];
        time_t last_error_at;           /* 0 = none since start */
        struct log_limit log;           /* the info line: one per 10 s */
    } dial;
    TAILQ_HEAD(mapping_conn_list, mapping_conn) conns;
    TAILQ_ENTRY(mapping) link;
    struct mapping_op *op;              /* a store write in flight for it (mapping.c) */
};

#endif

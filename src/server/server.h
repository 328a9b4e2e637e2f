/* The process's one context: the event loop and every module hanging off it. Owned by
 * main.c; every other module holds a pointer and never frees it. */
#ifndef PORTMUX_SERVER_H
#define PORTMUX_SERVER_H

#include <stdint.h>
#include <time.h>

struct event_base;
struct evdns_base;
struct config;
struct store;
struct mapping_registry;
struct tunnel_server;
struct api;
struct clients_registry;
struct cluster_sync;

/* Refusals by a limit, exported in /metrics. */
struct server_limit_counters {
    uint64_t mapping_connections;   /* limits.max_connections_per_mapping */
    uint64_t tunnel_streams;        /* tunnel.max_streams_per_client */
    uint64_t tunnel_hello_timeout;  /* tunnel.hello_timeout expired */
    uint64_t tunnel_pending;        /* tunnel.max_pending: closed at accept */
    uint64_t descriptors;           /* public connections refused to keep fds in reserve */
    uint64_t tunnel_auth_failed;    /* Hello refused */
    uint64_t tunnel_protocol_errors;/* tunnel closed for a protocol error */
    uint64_t api_connections;       /* api.max_connections */
    uint64_t tunnel_rate_limited;   /* Hello refused unchecked: too many failures (§4) */
    uint64_t tunnel_already_connected; /* Hello refused: the live session answered the probe */
    uint64_t tunnel_takeovers;      /* silent session replaced by a new Hello */
    uint64_t proxy_header;          /* from trusted_proxies without a usable PROXY header */
    uint64_t idle_closed;           /* connections closed by limits.idle_timeout */
    uint64_t dead_source_closed;    /* closed: a paused direction's source was reset */
    uint64_t slow_reader_closed;    /* closed: held bytes past the server's budget, unread */
};

struct server {
    struct event_base *base;
    struct evdns_base *dns;
    struct config *cfg;
    struct store *store;
    struct mapping_registry *mappings;
    struct tunnel_server *tunnel;   /* NULL when tunnel.enabled is false */
    struct api *api;
    struct clients_registry *clients; /* tunnel clients: config + stored (clients.h) */
    int api_port;                   /* the API's bound port, set by api_new (0 before) */
    struct cluster_sync *cluster_sync; /* database.url only: changes from other nodes (§7) */
    time_t started_at;              /* wall clock, for uptime and metrics */
    struct server_limit_counters limits;
};

#endif

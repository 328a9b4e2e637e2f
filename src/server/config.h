/* Server configuration: YAML (libyaml) -> struct config, with file:line:key errors. */
#ifndef PORTMUX_CONFIG_H
#define PORTMUX_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#include "log.h"
#include "netaddr.h"

struct config_client {
    char *name;
    char *token;
};

struct config {
    /* port_range */
    int port_from;               /* default 10000 */
    int port_end;                /* default 10100, inclusive */
    int *blacklist;              /* ports refused for mappings */
    size_t blacklist_len;

    /* tunnel */
    bool tunnel_enabled;         /* default true */
    char *tunnel_listen_addr;    /* default "0.0.0.0" */
    int tunnel_listen_port;      /* default 9000; 0 = ephemeral (tests) */
    struct config_client *clients; /* default none: a first start creates one (clients.h) */
    size_t clients_len;
    char *tls_cert_file;         /* "" = TLS off */
    char *tls_key_file;
    char *tls_client_ca;         /* "" = no mutual TLS */
    int heartbeat_interval;      /* seconds, default 10 */
    int heartbeat_timeout;       /* seconds, default 30 */
    int connect_timeout;         /* seconds, default 10 */
    int hello_timeout;           /* seconds, default 10: a Hello must come by then */
    int max_streams_per_client;  /* default 10000 */
    int takeover_probe_ms;       /* default 2000: how long a live session has to answer */
    int tunnel_max_pending;      /* default 128: connections waiting for their Hello */
    int session_buffer_limit;    /* bytes, default 64 MiB: window growth of one session */

    /* api */
    char *api_listen_addr;       /* default "127.0.0.1" */
    int api_listen_port;         /* default 8080; 0 = ephemeral (tests) */
    char *api_token;             /* "" = no auth */
    struct netaddr_cidr *allowed_ips; /* empty = any */
    size_t allowed_ips_len;
    /* Balancers whose connections start with a PROXY protocol header (proxy_wait.h):
     * on the tunnel port, the mapping ports and the API. Empty: none. */
    struct netaddr_cidr *trusted_proxies;
    size_t trusted_proxies_len;
    char **allowed_hosts;        /* extra Host names the API answers to (lower case) */
    size_t allowed_hosts_len;
    int api_max_connections;     /* default 256 */
    int api_connection_timeout;  /* seconds, default 10 (slowloris) */

    /* database */
    char *db_path;               /* default "./data/mappings.db" */
    char *db_url;                /* "" = SQLite at db_path; postgres://… = §7 cluster */

    /* cluster (§7, with db_url only) */
    char *cluster_node_name;     /* "" = the host name */
    char *cluster_advertise;     /* host:port of this node's tunnel endpoint for clients */

    /* mappings */
    char *mappings_bind_addr;    /* default "0.0.0.0"; "::" = dual-stack */

    /* limits */
    int max_connections_per_mapping; /* default 10000 */
    int idle_timeout;                /* seconds without a byte either way; 0 = never */

    /* log */
    enum log_level log_level;    /* default info */

    /* Set by a load whose document set nothing (an empty file, only comments, a null
     * document): at start that means the defaults; a reload refuses it (a truncated
     * write must not reset the running server to them). */
    bool empty_document;
};

/* The shortest API token accepted where the API can be reached from elsewhere (listening
 * off loopback, or behind a reverse proxy named in api.allowed_hosts): SPEC §4's bar for a
 * tunnel client's token. */
#define CONFIG_API_TOKEN_MIN 16

/* Fills cfg with the defaults of SPEC §5. Strings are heap copies owned by cfg. */
int config_init_defaults(struct config *cfg);

/* Reads YAML from path over the defaults already in cfg. On error returns -1 and writes
 * one line "FILE:LINE: KEY: reason" into err. With the tunnel on, the TLS files it names
 * must be readable PEM (certificate, its key, CA). */
int config_load_file(struct config *cfg, const char *path, char *err, size_t errlen);

/* Same, from memory; name stands for the file name in messages (tests, fuzzing). Unlike
 * config_load_file it does not open the TLS files the config names. */
int config_load_string(struct config *cfg, const char *yaml, size_t len, const char *name,
                       char *err, size_t errlen);

/* True when port may be mapped: inside the range and not blacklisted. */
bool config_port_allowed(const struct config *cfg, int port);

/* True when trusted_proxies lets a loopback peer (a balancer on this host: 127.0.0.0/8,
 * ::1, ::ffff:127.0.0.0/104) speak for others: an API on loopback is then reached from
 * elsewhere, and needs a token as one listening beyond loopback does. */
bool config_trusts_loopback(const struct config *cfg);
/* True when url names a PostgreSQL database (postgres:// or postgresql://), SPEC §7. */
bool config_db_url_ok(const char *url);

/* Frees everything cfg owns (not cfg itself). NULL-safe. */
void config_free(struct config *cfg);

#endif

/* SIGHUP: re-read the config file and apply what can change while running.
 *
 * Every module reads the keys below from srv->cfg when it uses them (an accept, a
 * create, a request), so applying them is moving the new value into the running config
 * on the loop thread; tunnel.clients goes to the clients registry. Keys that shaped
 * something built at start (listeners, TLS context, database) keep their running value
 * and are named in a warning, so the operator knows a restart is due. */
#include "reload.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_guard.h"
#include "clients.h"
#include "config.h"
#include "log.h"
#include "server.h"
#include "tunnel_server.h"

#define RELOAD_MOD "server"

static bool reload_str_changed(const char *a, const char *b)
{
    return strcmp(a ? a : "", b ? b : "") != 0;
}

static bool reload_clients_changed(const struct config *a, const struct config *b)
{
    if (a->clients_len != b->clients_len)
        return true;
    for (size_t i = 0; i < a->clients_len; i++) {
        if (reload_str_changed(a->clients[i].name, b->clients[i].name) ||
            reload_str_changed(a->clients[i].token, b->clients[i].token))
            return true;
    }
    return false;
}

/* Appends key to the comma-separated list in buf (bounded; the key set is fixed). */
static void reload_note(char *buf, size_t len, const char *key)
{
    size_t used = strlen(buf);
    if (used < len)
        snprintf(buf + used, len - used, "%s%s", used ? ", " : "", key);
}

/* Names the changed keys that only a restart applies. */
static void reload_restart_keys(const struct config *cur, const struct config *next,
                                char *buf, size_t len)
{
    const char *env = getenv("PORTMUX_DATABASE_URL");
    bool env_db_url = env && *env;
    const char *env_tok = getenv("PORTMUX_API_TOKEN");
    bool env_token = env_tok && *env_tok;
    const struct {
        const char *key;
        bool changed;
    } keys[] = {
        {"tunnel.enabled", cur->tunnel_enabled != next->tunnel_enabled},
        {"tunnel.listen_addr",
         reload_str_changed(cur->tunnel_listen_addr, next->tunnel_listen_addr)},
        {"tunnel.listen_port", cur->tunnel_listen_port != next->tunnel_listen_port},
        {"tunnel.tls.cert_file", reload_str_changed(cur->tls_cert_file, next->tls_cert_file)},
        {"tunnel.tls.key_file", reload_str_changed(cur->tls_key_file, next->tls_key_file)},
        {"tunnel.tls.client_ca", reload_str_changed(cur->tls_client_ca, next->tls_client_ca)},
        {"tunnel.heartbeat_interval", cur->heartbeat_interval != next->heartbeat_interval},
        {"tunnel.heartbeat_timeout", cur->heartbeat_timeout != next->heartbeat_timeout},
        {"api.listen_addr", reload_str_changed(cur->api_listen_addr, next->api_listen_addr)},
        {"api.listen_port", cur->api_listen_port != next->api_listen_port},
        /* PORTMUX_API_TOKEN wins over the file in the same way. */
        {"api.token", !env_token && reload_str_changed(cur->api_token, next->api_token)},
        {"api.max_connections", cur->api_max_connections != next->api_max_connections},
        {"database.path", reload_str_changed(cur->db_path, next->db_path)},
        /* PORTMUX_DATABASE_URL wins over the file (SPEC §7), so the file's url is only
         * compared when the environment does not set one. */
        {"database.url", !env_db_url && reload_str_changed(cur->db_url, next->db_url)},
        {"cluster.node_name",
         reload_str_changed(cur->cluster_node_name, next->cluster_node_name)},
        {"cluster.advertise",
         reload_str_changed(cur->cluster_advertise, next->cluster_advertise)},
        /* Every listener would move; one address for old mappings and another for new
         * ones would be a surprise. */
        {"mappings.bind_addr",
         reload_str_changed(cur->mappings_bind_addr, next->mappings_bind_addr)},
    };
    buf[0] = '\0';
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        if (keys[i].changed)
            reload_note(buf, len, keys[i].key);
    }
}

static bool reload_cidrs_changed(const struct netaddr_cidr *a, size_t alen,
                                 const struct netaddr_cidr *b, size_t blen)
{
    return alen != blen || (alen && memcmp(a, b, alen * sizeof(*a)));
}

static bool reload_blacklist_changed(const struct config *a, const struct config *b)
{
    return a->blacklist_len != b->blacklist_len ||
           (a->blacklist_len &&
            memcmp(a->blacklist, b->blacklist, a->blacklist_len * sizeof(*a->blacklist)));
}

static bool reload_hosts_changed(const struct config *a, const struct config *b)
{
    if (a->allowed_hosts_len != b->allowed_hosts_len)
        return true;
    for (size_t i = 0; i < a->allowed_hosts_len; i++) {
        if (reload_str_changed(a->allowed_hosts[i], b->allowed_hosts[i]))
            return true;
    }
    return false;
}

/* Swaps an owned array and its length between the two configs: the running config gets
 * the new one, and freeing next frees the old. */
#define RELOAD_SWAP(cur, next, arr, n)                                                      \
    do {                                                                                   \
        __typeof__((cur)->arr) tmp_arr = (cur)->arr;                                       \
        size_t tmp_n = (cur)->n;                                                           \
        (cur)->arr = (next)->arr;                                                          \
        (cur)->n = (next)->n;                                                              \
        (next)->arr = tmp_arr;                                                             \
        (next)->n = tmp_n;                                                                 \
    } while (0)

/* Moves the live keys into cur; lists the ones that changed in buf. */
static void reload_apply_live(struct config *cur, struct config *next, bool level_pinned,
                              char *buf, size_t len)
{
    buf[0] = '\0';
    if (!level_pinned && cur->log_level != next->log_level) {
        cur->log_level = next->log_level;
        log_set_level(cur->log_level);
        reload_note(buf, len, "log.level");
    }
    if (reload_cidrs_changed(cur->allowed_ips, cur->allowed_ips_len, next->allowed_ips,
                             next->allowed_ips_len)) {
        RELOAD_SWAP(cur, next, allowed_ips, allowed_ips_len);
        reload_note(buf, len, "api.allowed_ips");
    }
    /* Read at each accept: connections accepted from now on follow the new list. */
    if (reload_cidrs_changed(cur->trusted_proxies, cur->trusted_proxies_len,
                             next->trusted_proxies, next->trusted_proxies_len)) {
        /* As at start (main.c): a balancer on this host brings others to the API. */
        if (config_trusts_loopback(next) && api_guard_is_loopback(cur->api_listen_addr) &&
            strlen(cur->api_token) < CONFIG_API_TOKEN_MIN) {
            log_error(RELOAD_MOD, "reload: trusted_proxies keeps its running value: the new "
                      "list trusts a balancer on this host, which brings requests from "
                      "elsewhere to the API on loopback, and the API token has fewer than "
                      "%d characters (it changes with a restart)", CONFIG_API_TOKEN_MIN);
        } else {
            RELOAD_SWAP(cur, next, trusted_proxies, trusted_proxies_len);
            reload_note(buf, len, "trusted_proxies");
        }
    }
    if (reload_hosts_changed(cur, next)) {
        /* As at start (main.c): names a proxy forwards from put the API within reach of
         * others, which a short or absent token must not. */
        if (next->allowed_hosts_len > 0 && strlen(cur->api_token) < CONFIG_API_TOKEN_MIN) {
            log_error(RELOAD_MOD, "reload: api.allowed_hosts keeps its running value: it "
                      "lets a reverse proxy bring requests from elsewhere, and the API token "
                      "has fewer than %d characters (it changes with a restart)",
                      CONFIG_API_TOKEN_MIN);
        } else {
            RELOAD_SWAP(cur, next, allowed_hosts, allowed_hosts_len);
            reload_note(buf, len, "api.allowed_hosts");
        }
    }
    if (reload_blacklist_changed(cur, next)) {
        RELOAD_SWAP(cur, next, blacklist, blacklist_len);
        reload_note(buf, len, "port_range.blacklist");
    }
    const struct {
        const char *key;
        int *cur, next;
    } ints[] = {
        {"port_range.from", &cur->port_from, next->port_from},
        {"port_range.end", &cur->port_end, next->port_end},
        {"limits.max_connections_per_mapping", &cur->max_connections_per_mapping,
         next->max_connections_per_mapping},
        {"limits.idle_timeout", &cur->idle_timeout, next->idle_timeout},
        {"tunnel.max_streams_per_client", &cur->max_streams_per_client,
         next->max_streams_per_client},
        {"tunnel.connect_timeout", &cur->connect_timeout, next->connect_timeout},
        {"tunnel.hello_timeout", &cur->hello_timeout, next->hello_timeout},
        /* These three apply to connections and sessions that start after the reload. */
        {"tunnel.max_pending", &cur->tunnel_max_pending, next->tunnel_max_pending},
        {"tunnel.takeover_probe_ms", &cur->takeover_probe_ms, next->takeover_probe_ms},
        {"tunnel.session_buffer_limit", &cur->session_buffer_limit,
         next->session_buffer_limit},
        {"api.connection_timeout", &cur->api_connection_timeout, next->api_connection_timeout},
    };
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) {
        if (*ints[i].cur != ints[i].next) {
            *ints[i].cur = ints[i].next;
            reload_note(buf, len, ints[i].key);
        }
    }
}

static void reload_client_gone(const char *name, void *arg)
{
    struct server *srv = arg;
    tunnel_server_client_removed(srv->tunnel, name);
}

/* tunnel.clients: the registry takes the new list (closing the sessions of removed
 * clients), then the running config holds it, so the next reload compares against it. */
static void reload_apply_clients(struct server *srv, struct config *next, char *buf,
                                 size_t len)
{
    if (!reload_clients_changed(srv->cfg, next))
        return;
    if (!srv->clients || clients_reload_config(srv->clients, next, reload_client_gone, srv) != 0) {
        log_error(RELOAD_MOD, "reload: out of memory; tunnel.clients keeps its running value");
        return;
    }
    RELOAD_SWAP(srv->cfg, next, clients, clients_len);
    reload_note(buf, len, "tunnel.clients");
}

int reload_config(struct server *srv, const char *path, bool level_pinned)
{
    struct config next;
    char err[512], live[512], restart[512];
    if (config_init_defaults(&next) < 0) {
        log_error(RELOAD_MOD, "reload: out of memory; keeping the running config");
        return -1;
    }
    if (config_load_file(&next, path, err, sizeof(err)) < 0) {
        log_error(RELOAD_MOD, "reload failed, keeping the running config: %s", err);
        config_free(&next);
        return -1;
    }
    if (next.empty_document) {
        /* A file caught while being written, or emptied by mistake: applying it would
         * reset allowed_ips, the port range and the config's clients to the defaults. */
        log_error(RELOAD_MOD, "reload refused, keeping the running config: %s sets "
                  "nothing (empty, or only comments); to run on the defaults, restart", path);
        config_free(&next);
        return -1;
    }
    reload_restart_keys(srv->cfg, &next, restart, sizeof(restart));
    reload_apply_live(srv->cfg, &next, level_pinned, live, sizeof(live));
    reload_apply_clients(srv, &next, live, sizeof(live));
    if (srv->tunnel && tunnel_server_reload_tls(srv->tunnel) == 1)
        reload_note(live, sizeof(live), "tunnel.tls certificate (files read again)");
    log_info(RELOAD_MOD, "reloaded %s: %s", path, live[0] ? live : "nothing changed that applies live");
    if (restart[0])
        log_warn(RELOAD_MOD, "reload: %s changed in %s; the running values stay until a restart",
                 restart, path);
    config_free(&next);
    return 0;
}

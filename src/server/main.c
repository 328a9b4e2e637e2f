/* portmux-server: flags, config, wiring of the modules around one event loop, signals. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/event.h>

#include "api.h"
#include "cluster_sync.h"
#include "clients.h"
#include "api_guard.h"
#include "config.h"
#include "heap_tune.h"
#include "log.h"
#include "loop_guard.h"
#include "mapping.h"
#include "reload.h"
#include "server.h"
#include "store.h"
#include "token_text.h"
#include "tunnel_server.h"
#include "forward.h"

#define EXIT_CONFIG 2

static void usage(FILE *f)
{
    fprintf(f,
            "usage: portmux-server [--config FILE] [--log-level LEVEL]\n"
            "\n"
            "TCP port-forwarding server with persistent mappings, an HTTP API and a\n"
            "multiplexed tunnel to portmux-client.\n"
            "\n"
            "  -config, --config FILE    YAML config (see config.yaml.example);\n"
            "                            without it the defaults are used\n"
            "  --log-level LEVEL         debug|info|warn|error (overrides log.level)\n"
            "  -h, -help, --help         this text\n"
            "  -V, --version             print the version\n"
            "\n"
            "Signals: SIGHUP reloads the config file; SIGINT/SIGTERM stop the server.\n");
}

/* What SIGHUP needs from the command line: the file to read again, and whether
 * --log-level pinned the level (it keeps winning over log.level, as at start). */
struct main_reload {
    struct server *srv;
    const char *config_path;
    bool level_pinned;
};

/* Parses flags and loads the config. Returns 0 to run, 1 to exit 0 (help/version), or
 * EXIT_CONFIG. */
static int parse_args(int argc, char **argv, struct config *cfg, struct main_reload *rl)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"log-level", required_argument, NULL, 'l'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *path = NULL, *level = NULL;
    int c;
    while ((c = getopt_long_only(argc, argv, "hV", opts, NULL)) != -1) {
        switch (c) {
        case 'c': path = optarg; break;
        case 'l': level = optarg; break;
        case 'h': usage(stdout); return 1;
        case 'V': printf("portmux-server %s\n", PORTMUX_VERSION); return 1;
        default: usage(stderr); return EXIT_CONFIG;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "portmux-server: unexpected argument '%s'\n", argv[optind]);
        return EXIT_CONFIG;
    }
    rl->config_path = path;
    rl->level_pinned = level != NULL;
    char err[512];
    if (path && config_load_file(cfg, path, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s\n", err);
        return EXIT_CONFIG;
    }
    log_set_level(cfg->log_level);
    if (level) {
        enum log_level l;
        if (log_level_parse(level, &l) < 0) {
            fprintf(stderr, "portmux-server: --log-level: expected debug|info|warn|error\n");
            return EXIT_CONFIG;
        }
        log_set_level(l);
    }
    return 0;
}

/* PORTMUX_API_TOKEN keeps the token out of config files (containers, systemd
 * credentials). An empty value is ignored rather than switching auth off. */
static int apply_env(struct config *cfg)
{
    /* PORTMUX_DATABASE_URL (SPEC §7) puts the node on PostgreSQL whatever the file says,
     * so one config file serves a single server and a cluster's nodes alike. */
    const char *url = getenv("PORTMUX_DATABASE_URL");
    if (url && *url) {
        if (!config_db_url_ok(url)) {
            log_error("server", "PORTMUX_DATABASE_URL must be a postgres:// or "
                                "postgresql:// URL that libpq can parse (check its "
                                "percent-escapes, brackets and port)");
            return -2;
        }
        char *copy = strdup(url);
        if (!copy)
            return -1;
        free(cfg->db_url);
        cfg->db_url = copy;
    }
    const char *tok = getenv("PORTMUX_API_TOKEN");
    if (!tok || !*tok)
        return 0;
    if (!token_text_ok(tok)) {
        log_error("server", "PORTMUX_API_TOKEN must be printable ASCII without spaces (a "
                            "trailing newline?)");
        return -2;
    }
    char *copy = strdup(tok);
    if (!copy)
        return -1;
    free(cfg->api_token);
    cfg->api_token = copy;
    return 0;
}

/* SPEC §3 "Safe defaults": an API reachable from elsewhere must have a token, or anyone who
 * can reach the port can point mappings anywhere (the cloud metadata service, say); and one
 * at least as long as a tunnel client's (SPEC §4: 16 characters). */
static int check_safe_defaults(const struct config *cfg)
{
    size_t len = strlen(cfg->api_token);
    if (len >= CONFIG_API_TOKEN_MIN)
        return 0;
    if (api_guard_is_loopback(cfg->api_listen_addr) &&
        (cfg->allowed_hosts_len > 0 || config_trusts_loopback(cfg))) {
        /* api.allowed_hosts names the hosts a reverse proxy forwards from, and a balancer
         * on this host in trusted_proxies speaks for clients elsewhere: either way the API
         * is reached from elsewhere although it listens on loopback. */
        fprintf(stderr,
                "portmux-server: refusing to start: %s requests from elsewhere, and the API "
                "token (api.token or PORTMUX_API_TOKEN) has %zu characters; it needs at least "
                "%d (e.g. openssl rand -hex 24)\n",
                cfg->allowed_hosts_len > 0 ? "api.allowed_hosts lets a reverse proxy bring"
                                           : "trusted_proxies lets a balancer on this host bring",
                len, CONFIG_API_TOKEN_MIN);
        return EXIT_CONFIG;
    }
    if (api_guard_is_loopback(cfg->api_listen_addr))
        return 0;
    if (len == 0)
        fprintf(stderr,
                "portmux-server: refusing to start: api.listen_addr %s is not a loopback "
                "address and no API token is set (set api.token or PORTMUX_API_TOKEN)\n",
                cfg->api_listen_addr);
    else /* a token of a few characters is guessed as easily as none is bypassed */
        fprintf(stderr,
                "portmux-server: refusing to start: api.listen_addr %s is not a loopback "
                "address and the API token (api.token or PORTMUX_API_TOKEN) has %zu "
                "characters; it needs at least %d (e.g. openssl rand -hex 24)\n",
                cfg->api_listen_addr, len, CONFIG_API_TOKEN_MIN);
    return EXIT_CONFIG;
}

/* Descriptors are the server's working stock (two per relayed connection): use all the
 * hard limit allows rather than the 1024 most shells start with. */
static void raise_nofile_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max)
        return;
    rlim_t was = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        log_warn("server", "cannot raise the open-file limit from %llu: %s",
                 (unsigned long long)was, strerror(errno));
    else
        log_debug("server", "open-file limit raised from %llu to %llu",
                  (unsigned long long)was, (unsigned long long)rl.rlim_cur);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    struct server *srv = arg;
    log_info("server", "%s received, shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
    event_base_loopbreak(srv->base);
}

/* Until the loop runs, SIGINT/SIGTERM end the process at once, exit 0 (SPEC 5): the
 * loop's handler could not be run while a start waits (a database that does not answer,
 * its migration lock held elsewhere). A start has nothing to save: an uncommitted
 * transaction is rolled back by SQLite's journal or by PostgreSQL. */
static void on_signal_starting(int sig)
{
    static const char msg[] = "portmux: signal received while starting: exiting\n";
    (void)sig;
    ssize_t w = write(STDERR_FILENO, msg, sizeof(msg) - 1);
    (void)w;
    _exit(0);
}

static void on_sighup(evutil_socket_t sig, short what, void *arg)
{
    struct main_reload *rl = arg;
    if (!rl->config_path) {
        log_warn("server", "SIGHUP received, but the server runs on the defaults "
                           "(no --config): nothing to reload");
        return;
    }
    log_info("server", "SIGHUP received, reloading %s", rl->config_path);
    reload_config(rl->srv, rl->config_path, rl->level_pinned);
}

static struct evdns_base *dns_new(struct event_base *base)
{
    struct evdns_base *dns = evdns_base_new(base, EVDNS_BASE_INITIALIZE_NAMESERVERS);
    if (dns)
        return dns;
    /* No usable resolv.conf: IP literals and /etc/hosts still work. */
    log_warn("server", "no DNS nameservers configured; host names resolve from /etc/hosts only");
    dns = evdns_base_new(base, 0);
    if (dns)
        evdns_base_load_hosts(dns, NULL);
    return dns;
}

/* Opens the store and the listeners. Returns 0, or the exit status. */
/* The registry's loop check for the port it picks (mapping_handlers.targets_self). */
static bool main_targets_self(struct server *srv, const struct mapping_record *rec)
{
    char msg[192];
    return loop_guard_check_create(srv, rec, msg, sizeof(msg)) != 0;
}

/* The registry's tunnel handler (mapping_handlers.tunnel_ctx is the tunnel server). */
static void main_tunnel_forward(void *ctx, struct mapping *m, evutil_socket_t fd)
{
    tunnel_server_forward(ctx, m, fd);
}


/* HelloResponse's "nodes": the tunnel asks, the cluster sync knows (neither includes the
 * other). */
static struct json_t *server_cluster_nodes(void *arg)
{
    return cluster_sync_advertised_json(arg);
}

static int server_start(struct server *srv)
{
    char err[512];
    enum store_result sr;
    /* A URL holds a password maybe: it is never logged, only "postgres". */
    bool pg = srv->cfg->db_url[0] != '\0';
    srv->store = store_open(pg ? srv->cfg->db_url : srv->cfg->db_path, &sr, err, sizeof(err));
    if (!srv->store)
        return 1;  /* the store logged why */
    if (store_migrations_applied(srv->store) == 0)
        log_info("store", "%s: schema version %d, applied 0 migrations",
                 pg ? "postgres" : srv->cfg->db_path, store_schema_version(srv->store));
    srv->clients = clients_registry_new(srv->cfg, srv->store, err, sizeof(err));
    if (!srv->clients) {
        log_error("clients", "%s", err);
        return 1;
    }
    srv->mappings = mapping_registry_new(srv);
    if (srv->cfg->tunnel_enabled) {
        srv->tunnel = tunnel_server_new(srv, err, sizeof(err));
        if (!srv->tunnel) {
            log_error("tunnel", "%s", err);
            return 1;
        }
        log_info("tunnel", "listening on %s:%d", srv->cfg->tunnel_listen_addr,
                 tunnel_server_port(srv->tunnel));
        /* Hello tokens and every relayed byte cross that network as they are. */
        if (!srv->cfg->tls_cert_file[0] && !api_guard_is_loopback(srv->cfg->tunnel_listen_addr))
            log_warn("tunnel", "the tunnel on %s:%d has no TLS: client tokens and relayed "
                               "bytes cross the network in clear (set tunnel.tls.cert_file "
                               "and key_file; scripts/make-certs.sh makes them)",
                     srv->cfg->tunnel_listen_addr, tunnel_server_port(srv->tunnel));
    }
    if (srv->mappings) {
        /* The registry reaches the relays only through these: it includes neither. */
        const struct mapping_handlers h = {
            .direct = forward_start,
            .tunnel = srv->tunnel ? main_tunnel_forward : NULL,
            .tunnel_ctx = srv->tunnel,
            .targets_self = main_targets_self,
        };
        mapping_registry_set_handlers(srv->mappings, &h);
    }
    if (!srv->mappings || mapping_registry_restore(srv->mappings) < 0) {
        log_error("mapping", "cannot restore mappings from the store");
        return 1;
    }
    if (store_is_shared(srv->store)) {
        srv->cluster_sync = cluster_sync_new(srv, srv->cfg->db_url);
        if (!srv->cluster_sync) {
            log_error("cluster", "out of memory");
            return 1;
        }
        tunnel_server_set_nodes_source(srv->tunnel, server_cluster_nodes, srv->cluster_sync);
    }
    /* From here on no write waits on the loop (PostgreSQL; SQLite stays synchronous). */
    if (store_attach_loop(srv->store, srv->base, srv->dns) != 0) {
        log_error("store", "cannot put the database writes on the event loop");
        return 1;
    }
    srv->api = api_new(srv, err, sizeof(err));
    if (!srv->api) {
        log_error("api", "%s", err);
        return 1;
    }
    log_info("api", "listening on http://%s:%d (%zu mappings)", srv->cfg->api_listen_addr,
             api_port(srv->api), mapping_registry_count(srv->mappings));
    return 0;
}

/* Order matters: the API first (no new requests), then every connection and listener,
 * then the tunnels, and the database last so the final state is on disk. */
static void server_stop(struct server *srv)
{
    /* Writes still queued answer 503 now, while the API and registries that wait for
     * them are all still there. */
    store_fail_pending(srv->store);
    api_free(srv->api);
    srv->api = NULL;
    mapping_registry_free(srv->mappings);
    srv->mappings = NULL;
    tunnel_server_free(srv->tunnel);
    srv->tunnel = NULL;
    /* After the tunnels: their last writes (clients' last_seen) still see the gate, so a
     * stalled database does not hold the exit up once per client. */
    cluster_sync_free(srv->cluster_sync);
    srv->cluster_sync = NULL;
    clients_registry_free(srv->clients);
    srv->clients = NULL;
    store_close(srv->store);
    srv->store = NULL;
}

int main(int argc, char **argv)
{
    struct config cfg;
    struct server srv = {0};
    int status = EXIT_CONFIG;
    struct event *sigint = NULL, *sigterm = NULL, *sighup = NULL;
    struct main_reload rl = {.srv = &srv};
    setvbuf(stderr, NULL, _IOLBF, 0);
    /* A reload sent while the config is still being read (systemctl reload, logrotate)
     * would end the process: ignored until the loop's handler takes the signal over. */
    signal(SIGHUP, SIG_IGN);
    heap_tune_for_relay();
    if (config_init_defaults(&cfg) < 0)
        return 1;
    int r = parse_args(argc, argv, &cfg, &rl);
    if (r != 0) {
        status = r == 1 ? 0 : r;
        goto out;
    }
    r = apply_env(&cfg);
    if (r < 0) {
        status = r == -2 ? 2 : 1; /* a bad value is a config error, like the file's */
        goto out;
    }
    status = check_safe_defaults(&cfg);
    if (status != 0)
        goto out;
    raise_nofile_limit();
    signal(SIGPIPE, SIG_IGN);
    srv.cfg = &cfg;
    srv.started_at = time(NULL);
    srv.base = event_base_new();
    srv.dns = srv.base ? dns_new(srv.base) : NULL;
    if (!srv.dns) {
        status = 1;
        goto out;
    }
    sigint = evsignal_new(srv.base, SIGINT, on_signal, &srv);
    sigterm = evsignal_new(srv.base, SIGTERM, on_signal, &srv);
    sighup = evsignal_new(srv.base, SIGHUP, on_sighup, &rl);
    event_add(sighup, NULL);
    struct sigaction starting = {.sa_handler = on_signal_starting};
    sigemptyset(&starting.sa_mask);
    sigaction(SIGINT, &starting, NULL);
    sigaction(SIGTERM, &starting, NULL);
    status = server_start(&srv);
    if (status == 0) {
        /* From here the loop's handler: a clean stop. */
        event_add(sigint, NULL);
        event_add(sigterm, NULL);
        log_info("server", "portmux %s ready", PORTMUX_VERSION);
        event_base_dispatch(srv.base);
    }
    server_stop(&srv);
    if (status == 0)
        log_info("server", "stopped");
out:
    if (sigint)
        event_free(sigint);
    if (sigterm)
        event_free(sigterm);
    if (sighup)
        event_free(sighup);
    if (srv.dns)
        evdns_base_free(srv.dns, 0);
    if (srv.base)
        event_base_free(srv.base);
    config_free(&cfg);
    return status;
}

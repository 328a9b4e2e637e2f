/* portmux-client: flags, signals, and the reconnect loop with backoff around one tunnel
 * session (tunnel_client.c). */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/event.h>
#include <openssl/ssl.h>

#include "allow.h"
#include "client_tls.h"
#include "heap_tune.h"
#include "log.h"
#include "mux.h"
#include "netaddr.h"
#include "nodes.h"
#include "status.h"
#include "token_text.h"
#include "tunnel_client.h"

#define CLIENT_EXIT_OK 0
#define CLIENT_EXIT_LOST 1     /* the tunnel ended and --no-reconnect was given */
#define CLIENT_EXIT_REFUSED 2  /* usage error, refused Hello, TLS certificate failure */
#define BACKOFF_CAP_SECONDS 30.0

struct client_args {
    char host[256];
    uint16_t port;
    const char *token;
    const char *name;
    const char *server_name;
    const char *ca, *cert, *key;
    bool tls;
    bool no_reconnect;
    struct allow_list allow;
    struct allow_list allow_nodes; /* cluster nodes this client may connect to (nodes.c) */
    int heartbeat_interval, heartbeat_timeout, connect_timeout;
    int max_pending_dials;
    int max_streams;
    size_t session_buffer_limit;
};

struct client_main {
    struct event_base *base;
    struct tclient *tc;
    struct nodeset *nodes;   /* sessions to the other cluster nodes (nodes.c) */
    struct status *view;     /* the live block on a terminal, and the exit summary */
    struct event *retry;
    int attempt;             /* consecutive failed attempts */
    bool no_reconnect;
    /* The --server session waits: the node it reaches (through a load balancer) already
     * has this client's node session, and the node sessions serve the cluster. It tries
     * again once none of them is up. */
    bool standby;
    int status;
    size_t dials_total;      /* dials pending in every session (tclient_opts.dials_total) */
    size_t streams_total;    /* streams bridged in every session (tclient_opts.streams_total) */
};

static void usage(FILE *out)
{
    fprintf(out,
            "usage: portmux-client --server HOST:PORT --token TOKEN [options]\n"
            "Keeps a tunnel to a portmux server and dials local services on its request.\n"
            "\n"
            "  -s, --server HOST:PORT    server tunnel endpoint ([v6]:port for IPv6)\n"
            "  -t, --token TOKEN         client token (or env PORTMUX_TOKEN)\n"
            "  -n, --name NAME           client name (default \"default\")\n"
            "  -a, --allow RULE[,RULE]   only dial these: ADDR[/PREFIX]:PORT[-PORT],\n"
            "                            [V6[/PREFIX]]:PORT[-PORT] or HOSTNAME:PORT[-PORT];\n"
            "                            repeatable; default: anything\n"
            "      --allow-nodes RULE[,RULE]  cluster nodes (from the server's node list) this\n"
            "                            client may connect to, same rules; repeatable;\n"
            "                            default: those --allow permits, or any without it\n"
            "      --no-reconnect        exit (status 1) when the tunnel ends\n"
            "      --tls                 use TLS (1.2 or later) to the server\n"
            "      --ca FILE             CA bundle that must verify the server (default:\n"
            "                            the system store); implies --tls\n"
            "      --server-name NAME    name the server certificate must carry (default:\n"
            "                            the host of --server); implies --tls\n"
            "      --cert FILE --key FILE  client certificate for mutual TLS; implies --tls\n"
            "      --heartbeat-interval S  KeepAlive period (default 10)\n"
            "      --heartbeat-timeout S   drop a silent tunnel after S s (default 30)\n"
            "      --connect-timeout S     connect/Hello and dial timeout (default 10)\n"
            "      --max-pending-dials N   targets dialled at once; more ConnectRequests are\n"
            "                            refused (status 1) until some answer (default 1024)\n"
            "      --max-streams N         streams open at once (dialling, connected, or\n"
            "                            closed until the server's Close) in all\n"
            "                            sessions; more are refused (status 1)\n"
            "                            (default 10000)\n"
            "      --session-buffer-limit BYTES  all window growth of the session together\n"
            "                            (default 67108864): one stream moves at most about\n"
            "                            this much per round trip\n"
            "  -l, --log-level LEVEL     debug|info|warn|error (default info)\n"
            "  -h, --help                this text\n"
            "  -V, --version             print the version\n"
            "\n"
            "When stdout is a terminal, a status block at the bottom of the screen shows\n"
            "the session, RTT and every forwarded target with its streams and bytes; log\n"
            "lines (stderr) scroll above it. At exit a summary line goes to stdout.\n"
            "\n"
            "When the server is part of a cluster, the client keeps a session (same options)\n"
            "to every live node it lists, and a Node row per node in the status block.\n"
            "\n"
            "Exit status: 0 on SIGINT/SIGTERM, 1 tunnel lost with --no-reconnect,\n"
            "2 usage error, refused by the server, or TLS certificate failure.\n");
}

static int arg_seconds(const char *flag, const char *v, int *out)
{
    char *end;
    long n = strtol(v, &end, 10);
    if (*v == '\0' || *end != '\0' || n < 1 || n > 86400) {
        fprintf(stderr, "portmux-client: %s: expected seconds 1..86400, got '%s'\n", flag, v);
        return -1;
    }
    *out = (int)n;
    return 0;
}

/* Bytes: 0 (no window growth) up to INT_MAX, as the server's tunnel.session_buffer_limit. */
static int arg_bytes(const char *flag, const char *v, size_t *out)
{
    char *end;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (*v == '\0' || *end != '\0' || errno || n < 0 || n > INT_MAX) {
        fprintf(stderr, "portmux-client: %s: expected bytes 0..%d, got '%s'\n", flag, INT_MAX,
                v);
        return -1;
    }
    *out = (size_t)n;
    return 0;
}

static int arg_count(const char *flag, const char *v, int *out)
{
    char *end;
    long n = strtol(v, &end, 10);
    if (*v == '\0' || *end != '\0' || n < 1 || n > 1000000) {
        fprintf(stderr, "portmux-client: %s: expected a count 1..1000000, got '%s'\n", flag, v);
        return -1;
    }
    *out = (int)n;
    return 0;
}

enum { OPT_NO_RECONNECT = 256, OPT_TLS, OPT_CA, OPT_CERT, OPT_KEY, OPT_SERVER_NAME,
       OPT_HB_INTERVAL, OPT_HB_TIMEOUT, OPT_CONNECT_TIMEOUT, OPT_MAX_PENDING_DIALS, OPT_MAX_STREAMS,
       OPT_SESSION_BUFFER_LIMIT, OPT_ALLOW_NODES };

static const struct option client_options[] = {
    {"server", required_argument, NULL, 's'},
    {"token", required_argument, NULL, 't'},
    {"name", required_argument, NULL, 'n'},
    {"allow", required_argument, NULL, 'a'},
    {"allow-nodes", required_argument, NULL, OPT_ALLOW_NODES},
    {"log-level", required_argument, NULL, 'l'},
    {"help", no_argument, NULL, 'h'},
    {"version", no_argument, NULL, 'V'},
    {"no-reconnect", no_argument, NULL, OPT_NO_RECONNECT},
    {"tls", no_argument, NULL, OPT_TLS},
    {"ca", required_argument, NULL, OPT_CA},
    {"cert", required_argument, NULL, OPT_CERT},
    {"key", required_argument, NULL, OPT_KEY},
    {"server-name", required_argument, NULL, OPT_SERVER_NAME},
    {"heartbeat-interval", required_argument, NULL, OPT_HB_INTERVAL},
    {"heartbeat-timeout", required_argument, NULL, OPT_HB_TIMEOUT},
    {"connect-timeout", required_argument, NULL, OPT_CONNECT_TIMEOUT},
    {"max-pending-dials", required_argument, NULL, OPT_MAX_PENDING_DIALS},
    {"max-streams", required_argument, NULL, OPT_MAX_STREAMS},
    {"session-buffer-limit", required_argument, NULL, OPT_SESSION_BUFFER_LIMIT},
    {NULL, 0, NULL, 0},
};

/* One option; returns 0, 1 (done: help/version printed) or -1 (usage error). */
static int parse_one(int opt, const char *v, struct client_args *a, const char **server)
{
    char err[200];
    enum log_level level;
    switch (opt) {
    case 's': *server = v; return 0;
    case 't': a->token = v; return 0;
    case 'n': a->name = v; return 0;
    case 'a':
        if (allow_list_add(&a->allow, v, err, sizeof(err)) == 0)
            return 0;
        fprintf(stderr, "portmux-client: --allow: %s\n", err);
        return -1;
    case OPT_ALLOW_NODES:
        if (allow_list_add(&a->allow_nodes, v, err, sizeof(err)) == 0)
            return 0;
        fprintf(stderr, "portmux-client: --allow-nodes: %s\n", err);
        return -1;
    case 'l':
        if (log_level_parse(v, &level) == 0) {
            log_set_level(level);
            return 0;
        }
        fprintf(stderr, "portmux-client: --log-level: expected debug|info|warn|error\n");
        return -1;
    case 'h': usage(stdout); return 1;
    case 'V': printf("portmux-client %s\n", PORTMUX_VERSION); return 1;
    case OPT_NO_RECONNECT: a->no_reconnect = true; return 0;
    case OPT_TLS: a->tls = true; return 0;
    case OPT_CA: a->ca = v; a->tls = true; return 0;
    case OPT_CERT: a->cert = v; a->tls = true; return 0;
    case OPT_KEY: a->key = v; a->tls = true; return 0;
    case OPT_SERVER_NAME: a->server_name = v; a->tls = true; return 0; /* a name to check: TLS */
    case OPT_HB_INTERVAL: return arg_seconds("--heartbeat-interval", v, &a->heartbeat_interval);
    case OPT_HB_TIMEOUT: return arg_seconds("--heartbeat-timeout", v, &a->heartbeat_timeout);
    case OPT_CONNECT_TIMEOUT: return arg_seconds("--connect-timeout", v, &a->connect_timeout);
    case OPT_MAX_PENDING_DIALS:
        return arg_count("--max-pending-dials", v, &a->max_pending_dials);
    case OPT_MAX_STREAMS: return arg_count("--max-streams", v, &a->max_streams);
    case OPT_SESSION_BUFFER_LIMIT:
        return arg_bytes("--session-buffer-limit", v, &a->session_buffer_limit);
    default: return -1;
    }
}

static int check_args(struct client_args *a, const char *server)
{
    if (!server) {
        fprintf(stderr, "portmux-client: --server HOST:PORT is required\n");
        return -1;
    }
    if (netaddr_split_host_port(server, a->host, sizeof(a->host), &a->port) != 0) {
        fprintf(stderr, "portmux-client: --server: expected HOST:PORT or [V6]:PORT, got '%s'\n",
                server);
        return -1;
    }
    if (!a->token)
        a->token = getenv("PORTMUX_TOKEN");
    if (!a->token || !a->token[0]) {
        fprintf(stderr, "portmux-client: --token is required (or PORTMUX_TOKEN)\n");
        return -1;
    }
    if (!token_text_ok(a->token)) {
        fprintf(stderr, "portmux-client: the token (--token or PORTMUX_TOKEN) must be "
                        "printable ASCII without spaces (a trailing newline?)\n");
        return -1;
    }
    if (a->heartbeat_timeout <= a->heartbeat_interval) {
        /* The server refuses the same in its config: a timeout within one interval
         * drops a healthy session between two KeepAlives. */
        fprintf(stderr, "portmux-client: --heartbeat-timeout (%d) must be greater than "
                        "--heartbeat-interval (%d)\n", a->heartbeat_timeout,
                a->heartbeat_interval);
        return -1;
    }
    if (!a->name[0] || strlen(a->name) > 64) {
        fprintf(stderr, "portmux-client: --name must be 1..64 characters\n");
        return -1;
    }
    if (!a->cert != !a->key) {
        fprintf(stderr, "portmux-client: --cert and --key go together\n");
        return -1;
    }
    if (a->server_name && (!a->server_name[0] || strlen(a->server_name) > 255)) {
        /* SNI and the name check need one (RFC 6066: at most 255 bytes); an empty one
         * failed every connection as if the server were away, retried for ever. */
        fprintf(stderr, "portmux-client: --server-name must be 1..255 characters\n");
        return -1;
    }
    if (!a->server_name)
        a->server_name = a->host;
    return 0;
}

/* Returns 0 to run, 1 when done (help/version), -1 on a usage error. */
static int parse_args(int argc, char **argv, struct client_args *a)
{
    const char *server = NULL;
    int opt, r;
    a->name = "default";
    a->heartbeat_interval = 10;
    a->max_pending_dials = 1024;
    a->max_streams = 10000;
    a->session_buffer_limit = MUX_SESSION_BUFFER_LIMIT;
    a->heartbeat_timeout = 30;
    a->connect_timeout = 10;
    while ((opt = getopt_long(argc, argv, "s:t:n:a:l:hV", client_options, NULL)) != -1) {
        if ((r = parse_one(opt, optarg, a, &server)) != 0)
            return r;
    }
    if (optind < argc) {
        fprintf(stderr, "portmux-client: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    return check_args(a, server);
}

/* 1, 2, 4 ... 30 s, each +-20 % so a fleet of clients does not reconnect in step. */
static double backoff_seconds(int attempt)
{
    double base = attempt >= 6 ? BACKOFF_CAP_SECONDS : (double)(1 << (attempt - 1));
    double jitter = 0.8 + 0.4 * ((double)random() / (double)RAND_MAX);
    double d = base * jitter;
    return d > BACKOFF_CAP_SECONDS ? BACKOFF_CAP_SECONDS : d;
}

static void schedule_retry(struct client_main *cm)
{
    cm->attempt++;
    double d = backoff_seconds(cm->attempt);
    struct timeval tv = {(time_t)d, (suseconds_t)((d - (double)(time_t)d) * 1e6)};
    log_info("client", "reconnecting in %.1f s (attempt %d)", d, cm->attempt);
    status_retry(cm->view, d, cm->attempt);
    evtimer_add(cm->retry, &tv);
}

static void on_tunnel_end(enum tclient_end how, bool healthy, void *arg)
{
    struct client_main *cm = arg;
    if (how == TCLIENT_REFUSED) {
        fprintf(stderr, "portmux-client: %s\n", tclient_refusal(cm->tc));
        status_refused(cm->view, tclient_refusal(cm->tc));
        cm->status = CLIENT_EXIT_REFUSED;
        event_base_loopexit(cm->base, NULL);
        return;
    }
    if (cm->no_reconnect) {
        cm->status = CLIENT_EXIT_LOST;
        event_base_loopexit(cm->base, NULL);
        return;
    }
    nodeset_primary_lost(cm->nodes);
    size_t up = nodeset_up(cm->nodes);
    if (tclient_already_connected(cm->tc) && up > 0) {
        log_info("client", "--server reached a node this client is connected to already "
                           "(a load balancer in front of the cluster?); standing by while %zu "
                           "node session%s up", up, up == 1 ? " is" : "s are");
        status_lost(cm->view, "standing by: the node sessions serve the cluster");
        cm->standby = true;
        return;
    }
    if (healthy)
        cm->attempt = 0;
    schedule_retry(cm);
}

/* The last node session ended: the --server session is the way back into the cluster. */
static void on_nodes_all_down(void *arg)
{
    struct client_main *cm = arg;
    if (!cm->standby)
        return;
    cm->standby = false;
    cm->attempt = 0;
    log_info("client", "no node session is up: --server reconnects");
    schedule_retry(cm);
}

static void on_nodes(struct json_t *nodes, void *arg)
{
    struct client_main *cm = arg;
    nodeset_update(cm->nodes, nodes, true);
}

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
    struct client_main *cm = arg;
    if (tclient_connect(cm->tc) != 0) {
        log_error("client", "cannot start a connection");
        if (cm->no_reconnect) {
            cm->status = CLIENT_EXIT_LOST;
            event_base_loopexit(cm->base, NULL);
            return;
        }
        schedule_retry(cm);
    }
}

static void signal_cb(evutil_socket_t sig, short what, void *arg)
{
    struct client_main *cm = arg;
    log_info("client", "stopping on %s", sig == SIGINT ? "SIGINT" : "SIGTERM");
    cm->status = CLIENT_EXIT_OK;
    event_base_loopexit(cm->base, NULL);
}

static int run(struct client_args *a, SSL_CTX *ssl)
{
    struct client_main cm = {.no_reconnect = a->no_reconnect, .status = CLIENT_EXIT_LOST};
    struct evdns_base *dns = NULL;
    struct event *sigint = NULL, *sigterm = NULL;
    cm.base = event_base_new();
    if (!cm.base)
        goto out;
    dns = evdns_base_new(cm.base, EVDNS_BASE_INITIALIZE_NAMESERVERS);
    struct status_opts so = {.server_host = a->host, .server_port = a->port, .name = a->name,
                             .tls = a->tls, .out_fd = STDOUT_FILENO};
    cm.view = status_new(cm.base, &so);
    struct tclient_opts o = {
        .host = a->host, .port = a->port, .name = a->name, .token = a->token, .ssl = ssl,
        .server_name = a->server_name, .allow = &a->allow, .allow_nodes = &a->allow_nodes,
        .heartbeat_interval = a->heartbeat_interval, .heartbeat_timeout = a->heartbeat_timeout,
        .connect_timeout = a->connect_timeout, .max_pending_dials = a->max_pending_dials, .status = cm.view,
        .session_buffer_limit = a->session_buffer_limit, .dials_total = &cm.dials_total,
        .max_streams = a->max_streams, .streams_total = &cm.streams_total,
    };
    /* Every node session gets these options; --server-name only when given explicitly. */
    cm.nodes = nodeset_new(cm.base, dns, &o, a->server_name != a->host ? a->server_name : NULL,
                           a->no_reconnect);
    nodeset_set_on_all_down(cm.nodes, on_nodes_all_down, &cm);
    o.on_nodes = on_nodes;
    o.nodes_arg = &cm;
    cm.tc = tclient_new(cm.base, dns, &o, on_tunnel_end, &cm);
    cm.retry = evtimer_new(cm.base, retry_cb, &cm);
    sigint = evsignal_new(cm.base, SIGINT, signal_cb, &cm);
    sigterm = evsignal_new(cm.base, SIGTERM, signal_cb, &cm);
    if (!cm.view || !cm.nodes || !cm.tc || !cm.retry || !sigint || !sigterm ||
        event_add(sigint, NULL) != 0 || event_add(sigterm, NULL) != 0)
        goto out;
    if (a->allow.len == 0)
        log_warn("client", "no --allow given: any host:port the server asks for is dialled "
                           "(restrict it with --allow ADDR[/PREFIX]:PORT[-PORT])");
    if (!a->tls && !netaddr_host_is_local(a->host))
        log_warn("client", "no TLS: the token in the Hello and every forwarded byte cross the "
                           "network in clear (use --tls with --ca once the server has "
                           "tunnel.tls)");
    struct timeval now = {0, 0};
    evtimer_add(cm.retry, &now);
    cm.attempt = 0;
    event_base_dispatch(cm.base);
    status_finish(cm.view);
out:
    nodeset_free(cm.nodes);
    tclient_free(cm.tc);
    status_free(cm.view);
    if (cm.retry)
        event_free(cm.retry);
    if (sigint)
        event_free(sigint);
    if (sigterm)
        event_free(sigterm);
    if (dns)
        evdns_base_free(dns, 0);
    if (cm.base)
        event_base_free(cm.base);
    return cm.status;
}

int main(int argc, char **argv)
{
    struct client_args a;
    memset(&a, 0, sizeof(a));
    setvbuf(stderr, NULL, _IOLBF, 0);
    heap_tune_for_relay();
    /* Writes to a closed socket must fail with EPIPE, not kill the process. */
    signal(SIGPIPE, SIG_IGN);
    srandom((unsigned)time(NULL) ^ (unsigned)getpid());
    int r = parse_args(argc, argv, &a);
    if (r != 0) {
        allow_list_free(&a.allow);
        allow_list_free(&a.allow_nodes);
        if (r < 0)
            fprintf(stderr, "Try 'portmux-client --help'.\n");
        return r > 0 ? CLIENT_EXIT_OK : CLIENT_EXIT_REFUSED;
    }
    SSL_CTX *ssl = NULL;
    if (a.tls) {
        char err[300];
        ssl = client_tls_ctx_new(a.ca, a.cert, a.key, err, sizeof(err));
        if (!ssl) {
            fprintf(stderr, "portmux-client: %s\n", err);
            allow_list_free(&a.allow);
            allow_list_free(&a.allow_nodes);
        allow_list_free(&a.allow_nodes);
            return CLIENT_EXIT_REFUSED;
        }
    }
    int status = run(&a, ssl);
    SSL_CTX_free(ssl);
    allow_list_free(&a.allow);
    allow_list_free(&a.allow_nodes);
    return status;
}

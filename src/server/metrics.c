#include "metrics.h"

#include <stdio.h>
#include <stdlib.h>

#include "clients.h"
#include "cluster_sync.h"
#include "mapping.h"
#include "server.h"
#include "tunnel_server.h"

/* Label values are ours (ports, "direct"/"tunnel") or client names from the config, which
 * may hold any character: escape as the exposition format asks. */
static void put_label_value(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            fprintf(f, "\\%c", *s);
        else if (*s == '\n')
            fputs("\\n", f);
        else
            fputc(*s, f);
    }
}

static void put_header(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

struct mapping_metric {
    const char *name;
    const char *type;
    const char *help;
    size_t offset;  /* into struct mapping_stats */
};

static const struct mapping_metric mapping_metrics[] = {
    {"portmux_mapping_active_connections", "gauge", "Open connections through the mapping.",
     offsetof(struct mapping_stats, active)},
    {"portmux_mapping_connections_total", "counter", "Connections accepted by the mapping.",
     offsetof(struct mapping_stats, total)},
    {"portmux_mapping_failed_connections_total", "counter",
     "Connections that never reached their target.", offsetof(struct mapping_stats, failed)},
    {"portmux_mapping_received_bytes_total", "counter",
     "Bytes from public clients towards the target (bytes_in).",
     offsetof(struct mapping_stats, bytes_in)},
    {"portmux_mapping_sent_bytes_total", "counter",
     "Bytes from the target towards public clients (bytes_out).",
     offsetof(struct mapping_stats, bytes_out)},
    {"portmux_mapping_refused_connections_total", "counter",
     "Connections refused by limits.max_connections_per_mapping.",
     offsetof(struct mapping_stats, refused_limit)},
};

static void render_mappings(FILE *f, struct server *srv)
{
    for (size_t i = 0; i < sizeof(mapping_metrics) / sizeof(mapping_metrics[0]); i++) {
        const struct mapping_metric *mm = &mapping_metrics[i];
        put_header(f, mm->name, mm->type, mm->help);
        for (struct mapping *m = mapping_registry_first(srv->mappings); m;
             m = mapping_registry_next(m)) {
            uint64_t v = *(const uint64_t *)((const char *)&m->stats + mm->offset);
            fprintf(f, "%s{port=\"%d\",mode=\"%s\",client=\"", mm->name, m->rec.port,
                    m->rec.use_tunnel ? "tunnel" : "direct");
            put_label_value(f, m->rec.use_tunnel ? m->rec.client : "");
            fprintf(f, "\"} %llu\n", (unsigned long long)v);
        }
    }
    put_header(f, "portmux_connections_refused_total", "counter",
               "Public connections refused at accept, by mapping and reason.");
    for (struct mapping *m = mapping_registry_first(srv->mappings); m;
         m = mapping_registry_next(m)) {
        fprintf(f, "portmux_connections_refused_total{port=\"%d\",reason=\"allow_from\"} %llu\n",
                m->rec.port, (unsigned long long)m->stats.refused_allow);
        fprintf(f,
                "portmux_connections_refused_total{port=\"%d\",reason=\"max_connections\"} "
                "%llu\n",
                m->rec.port, (unsigned long long)m->stats.refused_limit);
    }
    put_header(f, "portmux_mappings", "gauge", "Stored mappings.");
    fprintf(f, "portmux_mappings %zu\n", mapping_registry_count(srv->mappings));
}

/* Every known client, connected or not (SPEC §4a), with its source and the takeovers
 * and refused duplicate Hellos counted since start. */
static void render_client_registry(FILE *f, struct server *srv)
{
    static const struct { const char *name, *type, *help; } fam[] = {
        {"portmux_tunnel_client_up", "gauge",
         "1 while the client has a live session; every known client is listed."},
        {"portmux_tunnel_client_takeovers_total", "counter",
         "Silent sessions of the client replaced by a new Hello (takeover probe)."},
        {"portmux_tunnel_client_refused_total", "counter",
         "Hellos with the client's credentials refused because its live session answered."},
    };
    size_t n = srv->clients ? clients_count(srv->clients) : 0;
    for (size_t k = 0; k < sizeof(fam) / sizeof(fam[0]); k++) {
        put_header(f, fam[k].name, fam[k].type, fam[k].help);
        for (size_t i = 0; i < n; i++) {
            const struct clients_entry *e = clients_at(srv->clients, i);
            unsigned long long v =
                k == 0 ? (srv->tunnel && tunnel_server_client_connected(srv->tunnel, e->name))
                : k == 1 ? e->takeovers
                         : e->refused;
            fprintf(f, "%s{client=\"", fam[k].name);
            put_label_value(f, e->name);
            fprintf(f, "\",source=\"%s\"} %llu\n",
                    e->source == CLIENTS_SOURCE_CONFIG ? "config" : "api", v);
        }
    }
}

/* One family of the per-client series, printed from the tunnel's plain struct. */
struct metrics_client_family {
    FILE *f;
    const char *name;
    size_t which;                 /* 0 rtt, 1 streams, 2 bytes in, 3 bytes out */
};

static void put_client_value(const struct tunnel_client_info *c, void *arg)
{
    const struct metrics_client_family *fam = arg;
    fprintf(fam->f, "%s{client=\"", fam->name);
    put_label_value(fam->f, c->name);
    if (fam->which == 0)
        fprintf(fam->f, "\"} %.6f\n", c->rtt_ms / 1000.0);
    else
        fprintf(fam->f, "\"} %llu\n",
                (unsigned long long)(fam->which == 1   ? (uint64_t)c->streams
                                     : fam->which == 2 ? c->bytes_in
                                                       : c->bytes_out));
}

static void render_clients(FILE *f, struct server *srv)
{
    render_client_registry(f, srv);
    put_header(f, "portmux_tunnel_clients_connected", "gauge", "Tunnel clients connected.");
    fprintf(f, "portmux_tunnel_clients_connected %zu\n",
            srv->tunnel ? tunnel_server_client_count(srv->tunnel) : 0);
    if (!srv->tunnel)
        return;
    static const struct { const char *name, *type, *help; } cm[] = {
        {"portmux_tunnel_client_rtt_seconds", "gauge", "Last keepalive round trip."},
        {"portmux_tunnel_client_streams", "gauge", "Open streams on the tunnel."},
        {"portmux_tunnel_client_received_bytes_total", "counter",
         "Bytes received from the client."},
        {"portmux_tunnel_client_sent_bytes_total", "counter", "Bytes sent to the client."},
    };
    for (size_t i = 0; i < sizeof(cm) / sizeof(cm[0]); i++) {
        put_header(f, cm[i].name, cm[i].type, cm[i].help);
        struct metrics_client_family fam = {f, cm[i].name, i};
        tunnel_server_clients_foreach(srv->tunnel, put_client_value, &fam);
    }
}

static void render_limits(FILE *f, struct server *srv)
{
    const struct server_limit_counters *l = &srv->limits;
    put_header(f, "portmux_limit_refused_total", "counter", "Things refused by a limit.");
    fprintf(f, "portmux_limit_refused_total{limit=\"max_connections_per_mapping\"} %llu\n",
            (unsigned long long)l->mapping_connections);
    fprintf(f, "portmux_limit_refused_total{limit=\"max_streams_per_client\"} %llu\n",
            (unsigned long long)l->tunnel_streams);
    fprintf(f, "portmux_limit_refused_total{limit=\"hello_timeout\"} %llu\n",
            (unsigned long long)l->tunnel_hello_timeout);
    fprintf(f, "portmux_limit_refused_total{limit=\"max_pending\"} %llu\n",
            (unsigned long long)l->tunnel_pending);
    fprintf(f, "portmux_limit_refused_total{limit=\"descriptor_reserve\"} %llu\n",
            (unsigned long long)l->descriptors);
    fprintf(f, "portmux_limit_refused_total{limit=\"api_max_connections\"} %llu\n",
            (unsigned long long)l->api_connections);
    fprintf(f, "portmux_limit_refused_total{limit=\"hello_failures\"} %llu\n",
            (unsigned long long)l->tunnel_rate_limited);
    put_header(f, "portmux_idle_closed_total", "counter",
               "Connections closed after limits.idle_timeout without a byte either way.");
    fprintf(f, "portmux_idle_closed_total %llu\n", (unsigned long long)l->idle_closed);
    put_header(f, "portmux_dead_source_closed_total", "counter",
               "Connections closed because a peer reset while its bytes waited on the other "
               "side (found by the once-a-second sweep).");
    fprintf(f, "portmux_dead_source_closed_total %llu\n",
            (unsigned long long)l->dead_source_closed);
    put_header(f, "portmux_slow_reader_closed_total", "counter",
               "Tunnelled connections closed because their peer did not read while the bytes "
               "held for such peers passed 4 x tunnel.session_buffer_limit.");
    fprintf(f, "portmux_slow_reader_closed_total %llu\n",
            (unsigned long long)l->slow_reader_closed);
    put_header(f, "portmux_proxy_header_refused_total", "counter",
               "Connections from trusted_proxies closed without a usable PROXY header, or "
               "because too many waited for theirs.");
    fprintf(f, "portmux_proxy_header_refused_total %llu\n",
            (unsigned long long)l->proxy_header);
    put_header(f, "portmux_tunnel_auth_failures_total", "counter", "Hello refused.");
    fprintf(f, "portmux_tunnel_auth_failures_total %llu\n",
            (unsigned long long)l->tunnel_auth_failed);
    put_header(f, "portmux_tunnel_takeovers_total", "counter",
               "Silent sessions replaced by a new Hello with the same name.");
    fprintf(f, "portmux_tunnel_takeovers_total %llu\n",
            (unsigned long long)l->tunnel_takeovers);
    put_header(f, "portmux_tunnel_already_connected_total", "counter",
               "Hellos refused because the live session of their name answered the probe.");
    fprintf(f, "portmux_tunnel_already_connected_total %llu\n",
            (unsigned long long)l->tunnel_already_connected);
    put_header(f, "portmux_tunnel_protocol_errors_total", "counter",
               "Tunnels closed for a protocol error.");
    fprintf(f, "portmux_tunnel_protocol_errors_total %llu\n",
            (unsigned long long)l->tunnel_protocol_errors);
}

char *metrics_render(struct server *srv, const uint64_t *api_status_count, size_t slots,
                     size_t *len)
{
    char *text = NULL;
    FILE *f = open_memstream(&text, len);
    if (!f)
        return NULL;
    render_mappings(f, srv);
    render_clients(f, srv);
    render_limits(f, srv);
    cluster_sync_metrics(srv->cluster_sync, f);
    put_header(f, "portmux_api_requests_total", "counter", "API requests by HTTP status.");
    for (size_t s = 0; api_status_count && s < slots; s++)
        if (api_status_count[s])
            fprintf(f, "portmux_api_requests_total{code=\"%zu\"} %llu\n", s,
                    (unsigned long long)api_status_count[s]);
    put_header(f, "process_start_time_seconds", "gauge", "Start time since the epoch.");
    fprintf(f, "process_start_time_seconds %lld\n", (long long)srv->started_at);
    if (fclose(f) != 0) {
        free(text);
        return NULL;
    }
    return text;
}

/* The API's JSON from plain structs; see api_json.h. */
#include "api_json.h"

#include <time.h>

#include "mapping.h"
#include "netaddr.h"
#include "tunnel_server.h"

/* "last_error" and "last_error_at" (ISO 8601 UTC): the last failed dial, both null when
 * none failed since the server started. */
static void api_json_last_error(const struct mapping *m, json_t *o)
{
    char when[32];
    struct tm tm;
    time_t t = m->dial.last_error_at;
    if (!t || !gmtime_r(&t, &tm)) {
        json_object_set_new(o, "last_error", json_null());
        json_object_set_new(o, "last_error_at", json_null());
        return;
    }
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    json_t *why = json_string(m->dial.last_error);
    json_object_set_new(o, "last_error", why ? why : json_string("(not valid UTF-8)"));
    json_object_set_new(o, "last_error_at", json_string(when));
}

json_t *api_json_mapping(const struct mapping *m)
{
    const struct mapping_record *r = &m->rec;
    enum mapping_status st = mapping_status(m);
    json_t *o = json_pack("{s:I, s:i, s:s, s:i, s:b, s:s, s:s, s:I, s:s}", "id", (json_int_t)r->id,
                          "port", r->port, "target_ip", r->target_ip, "target_port",
                          r->target_port, "use_tunnel", r->use_tunnel, "client", r->use_tunnel ? r->client : "",
                          "name", r->name, "created_at", (json_int_t)r->created_at, "status",
                          mapping_status_name(st));
    if (!o)
        return NULL;
    if (st == MAPPING_ERROR)
        json_object_set_new(o, "error", json_string(m->error));
    api_json_last_error(m, o);
    json_object_set_new(o, "active_connections", json_integer((json_int_t)m->stats.active));
    json_object_set_new(o, "total_connections", json_integer((json_int_t)m->stats.total));
    json_object_set_new(o, "failed_connections", json_integer((json_int_t)m->stats.failed));
    json_object_set_new(o, "bytes_in", json_integer((json_int_t)m->stats.bytes_in));
    json_object_set_new(o, "bytes_out", json_integer((json_int_t)m->stats.bytes_out));
    json_object_set_new(o, "refused_connections",
                        json_integer((json_int_t)(m->stats.refused_allow +
                                                  m->stats.refused_limit)));
    json_t *allow = json_array();
    for (size_t i = 0; i < m->allow_len; i++) {
        char text[STORE_CIDR_TEXT + 8];
        json_array_append_new(allow, json_string(netaddr_cidr_format(&m->allow[i], text,
                                                                     sizeof(text))));
    }
    json_object_set_new(o, "allow_from", allow);
    json_object_set_new(o, "proxy_protocol",
                        json_string(r->proxy_protocol == 1   ? "v1"
                                    : r->proxy_protocol == 2 ? "v2"
                                                             : "none"));
    json_object_set_new(o, "max_connections", json_integer(mapping_max_connections(m)));
    json_object_set_new(o, "rate_limit", json_integer((json_int_t)r->rate_limit));
    json_object_set_new(o, "enabled", json_boolean(r->enabled));
    return o;
}

json_t *api_json_tunnel_client(const struct tunnel_client_info *c)
{
    char when[32];
    struct tm tm;
    gmtime_r(&c->connected_at, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    return json_pack("{s:s, s:s, s:s, s:I, s:f, s:I, s:I}", "name", c->name,
                     "remote_addr", c->remote_addr, "connected_at", when,
                     "streams", (json_int_t)c->streams, "rtt_ms", c->rtt_ms,
                     "bytes_in", (json_int_t)c->bytes_in,
                     "bytes_out", (json_int_t)c->bytes_out);
}

struct api_json_list {
    json_t *arr;
    size_t n;
};

static void api_json_add_client(const struct tunnel_client_info *c, void *arg)
{
    struct api_json_list *l = arg;
    json_t *o = api_json_tunnel_client(c);
    if (o && json_array_append_new(l->arr, o) == 0)
        l->n++;
}

json_t *api_json_tunnel_clients(const struct tunnel_server *ts)
{
    struct api_json_list l = {json_array(), 0};
    if (ts && l.arr)
        tunnel_server_clients_foreach(ts, api_json_add_client, &l);
    return json_pack("{s:o, s:I}", "clients", l.arr, "count", (json_int_t)l.n);
}

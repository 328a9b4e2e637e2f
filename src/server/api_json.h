/* The API's JSON, built from the plain structs the domain modules expose: the registry's
 * struct mapping, the tunnel's struct tunnel_client_info. JSON lives at this edge only;
 * metrics.c prints the same structs as integers. */
#ifndef PORTMUX_API_JSON_H
#define PORTMUX_API_JSON_H

#include <jansson.h>

struct mapping;
struct tunnel_client_info;
struct tunnel_server;

/* The mapping as the API shows it (fields, status, error, counters). New reference. */
json_t *api_json_mapping(const struct mapping *m);

/* A live tunnel session: {name, remote_addr, connected_at, streams, rtt_ms, bytes_in,
 * bytes_out}. New reference. */
json_t *api_json_tunnel_client(const struct tunnel_client_info *c);

/* {"clients":[api_json_tunnel_client...], "count": n} for every live session (ts may be
 * NULL: none). New reference. */
json_t *api_json_tunnel_clients(const struct tunnel_server *ts);

#endif

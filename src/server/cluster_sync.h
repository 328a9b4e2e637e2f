/* SPEC §7 propagation: keeps this node's live mappings in line with the shared
 * PostgreSQL table (LISTEN/NOTIFY, a full read every 30 s and after every reconnect),
 * on the event loop without ever blocking it. Only with database.url. */
#ifndef PORTMUX_CLUSTER_SYNC_H
#define PORTMUX_CLUSTER_SYNC_H

#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

struct server;
struct cluster_sync;
struct mapping;

/* Starts connecting to conninfo (a libpq URL) in the background. NULL when out of memory. */
struct cluster_sync *cluster_sync_new(struct server *srv, const char *conninfo);
/* Closes its connection. NULL-safe. */
void cluster_sync_free(struct cluster_sync *cs);
/* How many full reads of the table were applied since start. */
uint64_t cluster_sync_resyncs(const struct cluster_sync *cs);

/* GET /api/cluster's data: {"nodes":[{name, advertise, alive, clients,
 * mappings_listening, heartbeat_at}], "count": n}; this node always among them. */
json_t *cluster_sync_nodes_json(struct cluster_sync *cs);
/* Adds "nodes": {"<node>": "<status>"} to a mapping's JSON: this node's live status and
 * each other live node's as of its last heartbeat ("pending" before it reported it).
 * Does nothing with cs NULL (SQLite). */
void cluster_sync_mapping_nodes(struct cluster_sync *cs, const struct mapping *m, json_t *obj);
/* HelloResponse's "nodes" (SPEC §4, §7): the advertise addresses of the live nodes,
 * this one first; nodes without one are left out. NULL with cs NULL (no cluster), and
 * until the nodes table was read once (a partial list would make clients drop nodes). */
json_t *cluster_sync_advertised_json(struct cluster_sync *cs);
/* The cluster's lines of /metrics. Does nothing with cs NULL. */
void cluster_sync_metrics(struct cluster_sync *cs, FILE *f);

#endif

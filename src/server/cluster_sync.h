/* SPEC §7 propagation: keeps this node's live mappings in line with the shared
 * PostgreSQL table (LISTEN/NOTIFY, a full read every 30 s and after every reconnect),
 * on the event loop without ever blocking it. Only with database.url. */
#ifndef PORTMUX_CLUSTER_SYNC_H
#define PORTMUX_CLUSTER_SYNC_H

#include <stdint.h>

struct server;
struct cluster_sync;

/* Starts connecting to conninfo (a libpq URL) in the background. NULL when out of memory. */
struct cluster_sync *cluster_sync_new(struct server *srv, const char *conninfo);
/* Closes its connection. NULL-safe. */
void cluster_sync_free(struct cluster_sync *cs);
/* How many full reads of the table were applied since start. */
uint64_t cluster_sync_resyncs(const struct cluster_sync *cs);

#endif

/* What the PostgreSQL store shares with the cluster sync (cluster_sync.c), which reads
 * the same table on a connection of its own. */
#ifndef PORTMUX_STORE_PG_H
#define PORTMUX_STORE_PG_H

#include <libpq-fe.h>

#include "store.h"

/* The columns store_pg_read_mapping expects, in its order. */
#define PG_MAP_COLS "id, port, target_ip, target_port, use_tunnel, client, name, created_at, " \
                    "allow_from, proxy_protocol, max_connections, rate_limit, enabled"

/* Reads row i of a result of "SELECT " PG_MAP_COLS into rec; text that would not fit is
 * cut at a UTF-8 boundary (logged). */
void store_pg_read_mapping(PGresult *res, int i, struct mapping_record *rec);

#define PG_CLIENT_COLS "name, token_hash, prev_hash, prev_valid_until, source, created_at, " \
                       "last_seen"

/* What a read of clients selects: the columns an insert writes, then id. */
#define PG_CLIENT_READ_COLS PG_CLIENT_COLS ", id"

/* Reads row i of a result of "SELECT " PG_CLIENT_READ_COLS into rec. */
void store_pg_read_client(PGresult *res, int i, struct client_record *rec);

/* libpq notice processor: server notices and connection-loss messages go to the debug
 * log, one line each, instead of libpq's default of stderr. */
void store_pg_notice(void *arg, const char *message);

#endif

/* The policy half of a mapping (SPEC §2): allow_from, max_connections, rate_limit and
 * the PROXY protocol header -- parsed from the record, checked at accept, and applied to
 * the live connections when an update changes them. Reads the types of mapping_types.h
 * only; mapping.h includes this header, so the first two functions below are public to
 * every user of mapping.h, and the rest is for mapping.c, which owns struct mapping. */
#ifndef PORTMUX_MAPPING_POLICY_H
#define PORTMUX_MAPPING_POLICY_H

#include <stdbool.h>
#include <sys/socket.h>

struct mapping;
struct mapping_conn;

/* The mapping's connection limit: rec.max_connections, or the config's default. */
int mapping_max_connections(const struct mapping *m);

/* The PROXY protocol header (rec.proxy_protocol) for connection mc accepted on socket fd
 * (whose local address is the header's destination) into buf of PROXY_HEADER_MAX bytes.
 * Returns its length, 0 when the mapping sends none. */
int mapping_conn_proxy_header(const struct mapping_conn *mc, int fd, unsigned char *buf);

/* True when sa may connect: allow_from is empty, or sa lies in one of its CIDRs. */
bool mapping_policy_allows(const struct mapping *m, const struct sockaddr *sa);

/* Logs a refused connection, at most once per mapping per 10 s (with the count of those
 * left out): a peer decides how often this runs. */
void mapping_policy_log_refused(struct mapping *m, const struct sockaddr *sa, const char *why);

/* Applies m->rec's policy (allow list, rate buckets and group); with live set, also to
 * the open connections: those allow_from or max_connections no longer admit are closed. */
void mapping_policy_apply(struct mapping *m, bool live);

/* Frees what the policy holds (the rate-limit group). Called after every connection is
 * gone. */
void mapping_policy_free(struct mapping *m);

#endif

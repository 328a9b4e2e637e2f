/* The policy half of a mapping (SPEC §2): allow_from, max_connections, rate_limit and
 * the PROXY protocol header -- parsed from the record, checked at accept, and applied to
 * the live connections when an update changes them. Private to mapping.c, which owns
 * struct mapping; the public pieces are declared in mapping.h. */
#ifndef PORTMUX_MAPPING_POLICY_H
#define PORTMUX_MAPPING_POLICY_H

#include <stdbool.h>
#include <sys/socket.h>

struct mapping;

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

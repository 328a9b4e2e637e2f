/* Failed dials of a mapping (issue 17): the last reason and its time for the API and the
 * console, and an info line per mapping at most every MAPPING_DIAL_LOG_SECONDS. */
#ifndef PORTMUX_MAPPING_DIAL_H
#define PORTMUX_MAPPING_DIAL_H

#include <jansson.h>

struct mapping;

#define MAPPING_DIAL_LOG_SECONDS 10

/* Records why a public connection of m never reached its target: a dead target, a
 * timeout, the client's refusal, no client. The reason is formatted into a fixed buffer
 * (longer ones are cut), so a peer cannot grow the line or the memory. */
void mapping_dial_failed(struct mapping *m, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Adds "last_error" and "last_error_at" (ISO 8601 UTC) to o, both null when no dial of m
 * failed since the server started. */
void mapping_dial_json(const struct mapping *m, json_t *o);

#endif

/* Prometheus text exposition (version 0.0.4) of the server's counters. */
#ifndef PORTMUX_METRICS_H
#define PORTMUX_METRICS_H

#include <stddef.h>
#include <stdint.h>

struct server;

/* Renders every metric; returns a malloc'd text (caller frees) and its length.
 * api_status_count[s] (slots entries; NULL when there is no API) is how many requests
 * the API answered with HTTP status s. */
char *metrics_render(struct server *srv, const uint64_t *api_status_count, size_t slots,
                     size_t *len);

#endif

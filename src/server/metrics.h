/* Prometheus text exposition (version 0.0.4) of the server's counters. */
#ifndef PORTMUX_METRICS_H
#define PORTMUX_METRICS_H

#include <stddef.h>

struct server;

/* Renders every metric; returns a malloc'd text (caller frees) and its length. */
char *metrics_render(struct server *srv, size_t *len);

#endif

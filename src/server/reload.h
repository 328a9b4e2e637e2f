/* SIGHUP: re-read the config file and apply what can change while running. */
#ifndef PORTMUX_RELOAD_H
#define PORTMUX_RELOAD_H

#include <stdbool.h>

struct server;

/* Loads path into a fresh config. On success moves the keys that apply live into
 * srv->cfg (log level unless level_pinned by --log-level, api.allowed_ips, port_range,
 * limits and timeouts read per use) and logs, in one warn line, the changed keys that
 * need a restart (their running values stay). A config that does not load is logged and
 * changes nothing. Returns 0 when the file loaded, -1 otherwise. Runs on the loop. */
int reload_config(struct server *srv, const char *path, bool level_pinned);

#endif

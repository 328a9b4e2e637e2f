/* The HTTP management API (SPEC §3) on libmicrohttpd. Owns struct api. */
#ifndef PORTMUX_API_H
#define PORTMUX_API_H

#include <stddef.h>
#include <stdint.h>

struct server;
struct api;

/* Starts MHD on api.listen_addr:listen_port inside the server's event loop. */
struct api *api_new(struct server *srv, char *err, size_t errlen);
/* Stops accepting and closes every API connection. NULL-safe. */
void api_free(struct api *api);
/* The bound port (useful when listen_port is 0). */
int api_port(const struct api *api);

/* Requests answered per HTTP status, for /metrics: calls fn for each status seen. */
void api_foreach_status_count(const struct api *api,
                              void (*fn)(unsigned status, uint64_t count, void *arg), void *arg);

#endif

/* Which requests the API answers at all, decided from headers alone (SPEC §3 bad_host,
 * cross_origin, safe defaults). Pure: no sockets, no MHD, so unit-tested and fuzzed. */
#ifndef PORTMUX_API_GUARD_H
#define PORTMUX_API_GUARD_H

#include <stdbool.h>

struct config;

/* True when ip is an IPv4 or IPv6 literal of this host's loopback: 127.0.0.0/8, ::1,
 * ::ffff:127.0.0.0/104. Anything else (a host name included) is false. */
bool api_guard_is_loopback(const char *ip);

/* DNS-rebinding defence: true when the Host header names this API — a loopback literal,
 * "localhost", api.listen_addr, or a name of api.allowed_hosts, with or without a port,
 * any letter case. A missing Host (HTTP/1.0) is allowed: browsers always send one. */
bool api_guard_host_ok(const struct config *cfg, const char *host);

/* Cross-site defence: true unless the request says it comes from a page elsewhere —
 * Sec-Fetch-Site: cross-site, or an Origin other than the API's own. The API's own origin
 * is http(s):// plus the Host the request was sent to (so the console's own requests pass),
 * or a name of api.allowed_hosts (a reverse proxy that rewrites Host). */
bool api_guard_origin_ok(const struct config *cfg, const char *origin, const char *host,
                         const char *sec_fetch_site);

#endif

/* Forwarding loops (SPEC §2 "No forwarding loops"): whether a direct mapping's target is
 * this server itself -- an address of this host on a port this server listens on. */
#ifndef PORTMUX_LOOP_GUARD_H
#define PORTMUX_LOOP_GUARD_H

#include <stdbool.h>
#include <stddef.h>

struct server;
struct sockaddr;
struct mapping_record;

/* True when sa is this host: loopback or unspecified (netaddr_is_self_by_definition), or
 * an address of one of its interfaces (getifaddrs, re-read at most every few seconds). */
bool loop_guard_is_local_addr(const struct sockaddr *sa);

/* True when name is this host by its name alone: localhost, *.localhost, or the host's
 * own name, any letter case. */
bool loop_guard_is_self_name(const char *name);

/* True when port is one this server listens on: a mapping's (stored ones in error too),
 * the API's, the tunnel's, or extra_port (the mapping being created; 0 = none). */
bool loop_guard_is_server_port(struct server *srv, int port, int extra_port);

/* True when connecting to sa would reach this server: a local address on a server port. */
bool loop_guard_targets_self(struct server *srv, const struct sockaddr *sa, int extra_port);

/* Create-time check of rec (direct mode only; tunnel targets are on the client's side).
 * An IP literal is checked at once; a host name by its name and by what /etc/hosts says
 * of it, without waiting for DNS (a name only DNS knows is checked at every dial).
 * Returns 0, or -1 with msg saying why (it names target_ip). */
int loop_guard_check_create(struct server *srv, const struct mapping_record *rec, char *msg,
                            size_t msglen);

#endif

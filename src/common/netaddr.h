/* Addresses: CIDR parsing and matching, host:port parsing, formatting. Pure. */
#ifndef PORTMUX_NETADDR_H
#define PORTMUX_NETADDR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct netaddr_cidr {
    int family;        /* AF_INET or AF_INET6 */
    uint8_t addr[16];  /* network bytes; 4 used for AF_INET */
    int prefix;        /* 0..32 or 0..128 */
};

/* Parses "10.0.0.0/8", "127.0.0.1" (= /32), "::1", "fd00::/8". Host bits beyond the
 * prefix are ignored. Returns 0, or -1 on anything malformed. */
int netaddr_cidr_parse(const char *s, struct netaddr_cidr *out);

/* Formats c canonically ("10.0.0.0/8", "fd00::/8") into buf (50 bytes always suffice).
 * Returns buf. */
const char *netaddr_cidr_format(const struct netaddr_cidr *c, char *buf, size_t buflen);

/* True when sa (AF_INET or AF_INET6) lies inside cidr. An IPv4-mapped IPv6 address
 * (::ffff:a.b.c.d) matches IPv4 CIDRs. */
bool netaddr_cidr_match(const struct netaddr_cidr *cidr, const struct sockaddr *sa);

/* True when s is an IPv4 or IPv6 literal. */
bool netaddr_is_ip_literal(const char *s);

/* Fills *ss and *len with the socket address of IP literal s and port. Returns 0, or -1
 * when s is not an IPv4 or IPv6 literal (a host name, say). */
int netaddr_ip_sockaddr(const char *s, uint16_t port, struct sockaddr_storage *ss,
                        socklen_t *len);

/* True when s is a plausible DNS host name (letters, digits, '-', '.', at most 253). */
bool netaddr_is_hostname(const char *s);

/* Splits "host:port" or "[v6]:port" into host (without brackets) and port 1..65535.
 * Returns 0, or -1 when malformed. */
int netaddr_split_host_port(const char *s, char *host, size_t hostlen, uint16_t *port);

/* The address of sa as 16 bytes, IPv4 as ::ffff:a.b.c.d, so one comparison covers both
 * spellings of an IPv4 address. Returns 0, or -1 for another family. */
int netaddr_key(const struct sockaddr *sa, uint8_t out[16]);

/* True when sa is this host by definition, whatever its interfaces: loopback
 * (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104) or unspecified (0.0.0.0, ::, ::ffff:0.0.0.0,
 * which connect() takes as this host). */
bool netaddr_is_self_by_definition(const struct sockaddr *sa);

/* True when a and b count as one source for the per-source limits (the tunnel's pending
 * connections and Hello failures, the API's connections): the same IPv4 address
 * (::ffff:a.b.c.d is a.b.c.d), or the same IPv6 /64, the share one host or site usually
 * holds (its other addresses cost an attacker nothing). */
bool netaddr_same_source(const struct sockaddr *a, const struct sockaddr *b);

/* What one source may hold of a shared limit of total places (pending tunnel
 * connections, API connections): an eighth, at least one. */
size_t netaddr_source_share(size_t total);

/* True for "localhost" and names under ".localhost" (RFC 6761), any letter case, with or
 * without a final dot. */
bool netaddr_is_localhost_name(const char *name);

/* True when host (a name or an IP literal, no brackets, no port) is this host by
 * definition: "localhost" and its subdomains, or a literal netaddr_is_self_by_definition
 * accepts. Looks nothing up: any other name is taken as elsewhere. */
bool netaddr_host_is_local(const char *host);

/* Formats sa as "1.2.3.4:80" or "[::1]:80" into buf. Returns buf. */
const char *netaddr_format(const struct sockaddr *sa, char *buf, size_t buflen);

#endif

/* The client's --allow list: which host:port a ConnectRequest may make it dial.
 * Rules are ADDR[/PREFIX]:PORT[-PORT], IPv6 in brackets ("[::1]:22",
 * "[fd00::/8]:5432-5439"), or HOSTNAME:PORT[-PORT] matching that exact name. */
#ifndef PORTMUX_ALLOW_H
#define PORTMUX_ALLOW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "netaddr.h"

#define ALLOW_HOST_MAX 253

struct allow_rule {
    bool is_host;                     /* true: host name rule; false: CIDR rule */
    struct netaddr_cidr cidr;
    char host[ALLOW_HOST_MAX + 1];
    uint16_t port_lo, port_hi;        /* inclusive, 1..65535 */
};

struct allow_list {
    struct allow_rule *rules;
    size_t len;
};

/* Parses one rule. Returns 0, or -1 with a reason in err. */
int allow_rule_parse(const char *text, struct allow_rule *out, char *err, size_t errlen);

/* Appends the rules of "RULE[,RULE...]" to list (all or none). Returns 0, or -1 with
 * "rule 'x': reason" in err. */
int allow_list_add(struct allow_list *list, const char *spec, char *err, size_t errlen);

/* True when host:port may be dialled: an empty list allows everything; an IP literal
 * ("10.0.0.1", "::1" or "[::1]") matches CIDR rules, a host name matches host rules
 * (case-insensitive, exact). */
bool allow_list_match(const struct allow_list *list, const char *host, uint16_t port);

/* Frees the rules; the list is empty afterwards. NULL-safe. */
void allow_list_free(struct allow_list *list);

#endif

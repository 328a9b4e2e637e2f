/* --allow rules: parsing and matching. Pure: no I/O, no name resolution (a host name
 * rule matches that name only, never what it resolves to). */
#include "allow.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Longest rule text worth looking at: a host name, ':' and "65535-65535". */
#define ALLOW_RULE_MAX (ALLOW_HOST_MAX + 16)

/* Parses a port 1..65535 of 1-5 digits spanning exactly [s, end). */
static int allow_port(const char *s, const char *end, uint16_t *out)
{
    long v = 0;
    if (end <= s || end - s > 5)
        return -1;
    for (const char *p = s; p < end; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        v = v * 10 + (*p - '0');
    }
    if (v < 1 || v > 65535)
        return -1;
    *out = (uint16_t)v;
    return 0;
}

static int allow_ports(const char *s, struct allow_rule *r)
{
    const char *end = s + strlen(s);
    const char *dash = strchr(s, '-');
    if (!dash)
        dash = end;
    if (allow_port(s, dash, &r->port_lo) != 0)
        return -1;
    r->port_hi = r->port_lo;
    if (dash != end && allow_port(dash + 1, end, &r->port_hi) != 0)
        return -1;
    return r->port_lo <= r->port_hi ? 0 : -1;
}

static int allow_fail(char *err, size_t errlen, const char *reason)
{
    snprintf(err, errlen, "%s", reason);
    return -1;
}

/* Splits text into the address part (copied into addr) and the port part. */
static const char *allow_split(const char *text, char *addr, size_t addrlen, bool *bracketed)
{
    const char *a = text, *ports;
    size_t n;
    *bracketed = text[0] == '[';
    if (*bracketed) {
        const char *close = strchr(text, ']');
        if (!close || close[1] != ':')
            return NULL;
        a = text + 1;
        n = (size_t)(close - a);
        ports = close + 2;
    } else {
        const char *colon = strrchr(text, ':');
        if (!colon)
            return NULL;
        n = (size_t)(colon - text);
        ports = colon + 1;
    }
    if (n == 0 || n >= addrlen)
        return NULL;
    memcpy(addr, a, n);
    addr[n] = '\0';
    return ports;
}

int allow_rule_parse(const char *text, struct allow_rule *out, char *err, size_t errlen)
{
    char addr[ALLOW_RULE_MAX + 1];
    bool bracketed;
    struct allow_rule r;
    memset(&r, 0, sizeof(r));
    if (!text || strlen(text) > ALLOW_RULE_MAX)
        return allow_fail(err, errlen, "too long");
    const char *ports = allow_split(text, addr, sizeof(addr), &bracketed);
    if (!ports)
        return allow_fail(err, errlen, "expected ADDR[/PREFIX]:PORT[-PORT]");
    if (allow_ports(ports, &r) != 0)
        return allow_fail(err, errlen, "bad port or port range (1-65535, low-high)");
    if (netaddr_cidr_parse(addr, &r.cidr) == 0) {
        if (bracketed != (r.cidr.family == AF_INET6))
            return allow_fail(err, errlen, "IPv6 addresses go in brackets, IPv4 without");
    } else if (!bracketed && !strchr(addr, '/') && netaddr_is_hostname(addr)) {
        /* netaddr_is_hostname caps the length at ALLOW_HOST_MAX. */
        r.is_host = true;
        memcpy(r.host, addr, strlen(addr) + 1);
    } else {
        return allow_fail(err, errlen, "bad address, prefix or host name");
    }
    *out = r;
    return 0;
}

int allow_list_add(struct allow_list *list, const char *spec, char *err, size_t errlen)
{
    char reason[96];
    size_t cap = 1;
    for (const char *p = spec; *p; p++)
        cap += *p == ',';
    struct allow_rule *rules = realloc(list->rules, (list->len + cap) * sizeof(*rules));
    if (!rules)
        return allow_fail(err, errlen, "out of memory");
    list->rules = rules;
    size_t n = 0;
    const char *p = spec;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char text[ALLOW_RULE_MAX + 2];
        bool too_long = len >= sizeof(text) - 1;
        size_t keep = too_long ? sizeof(text) - 1 : len;
        memcpy(text, p, keep);
        text[keep] = '\0';
        if (too_long || allow_rule_parse(text, &rules[list->len + n], reason, sizeof(reason)) != 0) {
            snprintf(err, errlen, "rule '%.*s': %s", (int)(len > 64 ? 64 : len), p,
                     too_long ? "too long" : reason);
            return -1;
        }
        n++;
        if (!comma)
            break;
        p = comma + 1;
    }
    list->len += n;
    return 0;
}

/* Fills ss from an IP literal, with or without brackets. */
static bool allow_literal(const char *host, struct sockaddr_storage *ss)
{
    char buf[INET6_ADDRSTRLEN + 2];
    size_t n = strlen(host);
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']' && n - 2 < sizeof(buf)) {
        memcpy(buf, host + 1, n - 2);
        buf[n - 2] = '\0';
        host = buf;
    }
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *in = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &in->sin_addr) == 1) {
        in->sin_family = AF_INET;
        return true;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            /* ::ffff:a.b.c.d dials a.b.c.d: it is an IPv4 target and obeys IPv4 rules. */
            struct in_addr v4;
            memcpy(&v4, &in6->sin6_addr.s6_addr[12], 4);
            memset(ss, 0, sizeof(*ss));
            in->sin_family = AF_INET;
            in->sin_addr = v4;
        }
        return true;
    }
    return false;
}

bool allow_list_match(const struct allow_list *list, const char *host, uint16_t port)
{
    if (!list || list->len == 0)
        return true;
    struct sockaddr_storage ss;
    bool literal = allow_literal(host, &ss);
    for (size_t i = 0; i < list->len; i++) {
        const struct allow_rule *r = &list->rules[i];
        if (port < r->port_lo || port > r->port_hi)
            continue;
        /* An IPv6 rule never matches an IPv4 target: [::/0] must not admit 127.0.0.1
         * through the ::ffff:0:0/96 space that the generic CIDR match maps v4 into. */
        if (literal && !r->is_host && r->cidr.family != ss.ss_family)
            continue;
        if (literal && !r->is_host && netaddr_cidr_match(&r->cidr, (struct sockaddr *)&ss))
            return true;
        if (!literal && r->is_host && strcasecmp(r->host, host) == 0)
            return true;
    }
    return false;
}

void allow_list_free(struct allow_list *list)
{
    if (!list)
        return;
    free(list->rules);
    list->rules = NULL;
    list->len = 0;
}

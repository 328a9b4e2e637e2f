/* Addresses: CIDR parsing and matching, host:port parsing, formatting. Pure: no I/O. */
#include "netaddr.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* Longest text a CIDR can be: a full IPv6 literal, '/', three digits. Anything longer
 * is malformed, so a fixed buffer of this size never truncates a valid input. */
#define NETADDR_CIDR_MAX (INET6_ADDRSTRLEN + 4)

/* Parses a decimal number of 1..maxdigits digits (no sign, no spaces) up to limit. */
static int parse_decimal(const char *s, int maxdigits, long limit, long *out)
{
    long v = 0;
    int n = 0;
    for (; s[n] != '\0'; n++) {
        if (s[n] < '0' || s[n] > '9' || n >= maxdigits)
            return -1;
        v = v * 10 + (s[n] - '0');
    }
    if (n == 0 || v > limit)
        return -1;
    *out = v;
    return 0;
}

/* Zeroes the bits past prefix, so matching compares whole bytes without masks. */
static void clear_host_bits(uint8_t *addr, int nbytes, int prefix)
{
    for (int i = 0; i < nbytes; i++) {
        int keep = prefix - i * 8;
        if (keep >= 8)
            continue;
        addr[i] &= keep <= 0 ? 0 : (uint8_t)(0xff << (8 - keep));
    }
}

int netaddr_cidr_parse(const char *s, struct netaddr_cidr *out)
{
    char buf[NETADDR_CIDR_MAX];
    if (s == NULL || strlen(s) >= sizeof(buf))
        return -1;
    strcpy(buf, s);
    char *slash = strchr(buf, '/');
    if (slash != NULL)
        *slash = '\0';

    struct netaddr_cidr c;
    memset(&c, 0, sizeof(c));
    if (inet_pton(AF_INET, buf, c.addr) == 1)
        c.family = AF_INET;
    else if (inet_pton(AF_INET6, buf, c.addr) == 1)
        c.family = AF_INET6;
    else
        return -1;

    int bits = c.family == AF_INET ? 32 : 128;
    long prefix = bits;
    if (slash != NULL && parse_decimal(slash + 1, 3, bits, &prefix) != 0)
        return -1;
    c.prefix = (int)prefix;
    clear_host_bits(c.addr, bits / 8, c.prefix);
    *out = c;
    return 0;
}

const char *netaddr_cidr_format(const struct netaddr_cidr *c, char *buf, size_t buflen)
{
    char addr[INET6_ADDRSTRLEN];
    if (!inet_ntop(c->family, c->addr, addr, sizeof(addr)))
        addr[0] = '\0';
    snprintf(buf, buflen, "%s/%d", addr, c->prefix);
    return buf;
}

/* True when the first prefix bits of a and b agree. */
static bool prefix_equal(const uint8_t *a, const uint8_t *b, int prefix)
{
    int whole = prefix / 8;
    if (memcmp(a, b, (size_t)whole) != 0)
        return false;
    int rest = prefix % 8;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (a[whole] & mask) == (b[whole] & mask);
}

static const uint8_t v4mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

bool netaddr_cidr_match(const struct netaddr_cidr *cidr, const struct sockaddr *sa)
{
    uint8_t addr[16];
    if (cidr == NULL || sa == NULL)
        return false;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        if (cidr->family == AF_INET) {
            memcpy(addr, &in->sin_addr, 4);
            return prefix_equal(addr, cidr->addr, cidr->prefix);
        }
        /* A v4 peer is also ::ffff:a.b.c.d, so a v6 rule written that way covers it. */
        memcpy(addr, v4mapped_prefix, 12);
        memcpy(addr + 12, &in->sin_addr, 4);
        return prefix_equal(addr, cidr->addr, cidr->prefix);
    }
    if (sa->sa_family != AF_INET6)
        return false;
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    memcpy(addr, &in6->sin6_addr, 16);
    if (cidr->family == AF_INET6)
        return prefix_equal(addr, cidr->addr, cidr->prefix);
    /* Dual-stack listeners report v4 peers as ::ffff:a.b.c.d; they must obey v4 rules. */
    if (memcmp(addr, v4mapped_prefix, 12) != 0)
        return false;
    return prefix_equal(addr + 12, cidr->addr, cidr->prefix);
}

int netaddr_key(const struct sockaddr *sa, uint8_t out[16])
{
    if (sa == NULL)
        return -1;
    if (sa->sa_family == AF_INET) {
        memcpy(out, v4mapped_prefix, 12);
        memcpy(out + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
        return 0;
    }
    if (sa->sa_family == AF_INET6) {
        memcpy(out, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
        return 0;
    }
    return -1;
}

bool netaddr_is_self_by_definition(const struct sockaddr *sa)
{
    static const uint8_t zero[16], loop6[16] = {[15] = 1};
    uint8_t k[16];
    if (netaddr_key(sa, k) != 0)
        return false;
    if (memcmp(k, zero, 16) == 0 || memcmp(k, loop6, 16) == 0)
        return true;
    if (memcmp(k, v4mapped_prefix, 12) != 0)
        return false;
    return k[12] == 127 || (k[12] == 0 && k[13] == 0 && k[14] == 0 && k[15] == 0);
}

bool netaddr_is_localhost_name(const char *name)
{
    static const char suffix[] = ".localhost";
    if (name == NULL)
        return false;
    size_t n = strlen(name);
    if (n > 0 && name[n - 1] == '.')
        n--;
    if (n == 9 && strncasecmp(name, "localhost", 9) == 0)
        return true;
    return n > sizeof(suffix) - 1 &&
           strncasecmp(name + n - (sizeof(suffix) - 1), suffix, sizeof(suffix) - 1) == 0;
}

bool netaddr_is_ip_literal(const char *s)
{
    uint8_t addr[16];
    if (s == NULL)
        return false;
    return inet_pton(AF_INET, s, addr) == 1 || inet_pton(AF_INET6, s, addr) == 1;
}

int netaddr_ip_sockaddr(const char *s, uint16_t port, struct sockaddr_storage *ss,
                        socklen_t *len)
{
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *sin = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
    if (s && inet_pton(AF_INET, s, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        sin->sin_port = htons(port);
        *len = sizeof(*sin);
        return 0;
    }
    if (s && inet_pton(AF_INET6, s, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(port);
        *len = sizeof(*sin6);
        return 0;
    }
    return -1;
}

static bool is_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

bool netaddr_is_hostname(const char *s)
{
    if (s == NULL)
        return false;
    size_t len = strlen(s);
    if (len == 0 || len > 253)
        return false;
    /* Labels of 1..63 characters that neither start nor end with '-' (RFC 1123). */
    size_t label = 0;
    for (size_t i = 0; i <= len; i++) {
        char c = s[i];
        if (c == '.' || c == '\0') {
            if (label == 0 || s[i - 1] == '-')
                return false;
            label = 0;
            continue;
        }
        if (!is_alnum(c) && !(c == '-' && label > 0))
            return false;
        if (++label > 63)
            return false;
    }
    return true;
}

/* Splits s into its host part [host, host+*hostn) and the text after the port colon. */
static const char *split_parts(const char *s, const char **host, size_t *hostn)
{
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (close == NULL || close[1] != ':')
            return NULL;
        *host = s + 1;
        *hostn = (size_t)(close - s - 1);
        return close + 2;
    }
    const char *colon = strrchr(s, ':');
    if (colon == NULL)
        return NULL;
    *host = s;
    *hostn = (size_t)(colon - s);
    /* A bare v6 literal ("::1:80") is ambiguous; it must come in brackets. */
    if (memchr(s, ':', *hostn) != NULL)
        return NULL;
    return colon + 1;
}

int netaddr_split_host_port(const char *s, char *host, size_t hostlen, uint16_t *port)
{
    const char *h = NULL;
    size_t hn = 0;
    if (s == NULL || host == NULL || port == NULL)
        return -1;
    const char *p = split_parts(s, &h, &hn);
    if (p == NULL || hn == 0 || hn >= hostlen || memchr(h, '[', hn) || memchr(h, ']', hn))
        return -1;
    long v;
    if (parse_decimal(p, 5, 65535, &v) != 0 || v < 1)
        return -1;
    memcpy(host, h, hn);
    host[hn] = '\0';
    *port = (uint16_t)v;
    return 0;
}

const char *netaddr_format(const struct sockaddr *sa, char *buf, size_t buflen)
{
    char ip[INET6_ADDRSTRLEN];
    if (buf == NULL || buflen == 0)
        return buf;
    if (sa != NULL && sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
        snprintf(buf, buflen, "%s:%u", ip, (unsigned)ntohs(in->sin_port));
    } else if (sa != NULL && sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
        snprintf(buf, buflen, "[%s]:%u", ip, (unsigned)ntohs(in6->sin6_port));
    } else {
        snprintf(buf, buflen, "?");
    }
    return buf;
}

bool netaddr_host_is_local(const char *host)
{
    struct sockaddr_storage ss;
    socklen_t len;
    if (host == NULL)
        return false;
    if (netaddr_is_localhost_name(host))
        return true;
    return netaddr_ip_sockaddr(host, 0, &ss, &len) == 0 &&
           netaddr_is_self_by_definition((const struct sockaddr *)&ss);
}

bool netaddr_same_source(const struct sockaddr *a, const struct sockaddr *b)
{
    uint8_t x[16], y[16];
    if (netaddr_key(a, x) != 0 || netaddr_key(b, y) != 0)
        return false;
    /* An IPv4 address (in its mapped form) is compared whole, IPv6 by its /64. */
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    bool v4 = memcmp(x, mapped, 12) == 0;
    if (v4 != (memcmp(y, mapped, 12) == 0))
        return false;
    return memcmp(x, y, v4 ? 16 : 8) == 0;
}

size_t netaddr_source_share(size_t total)
{
    return total / 8 ? total / 8 : 1;
}

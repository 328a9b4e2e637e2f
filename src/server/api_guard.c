#include "api_guard.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "config.h"

/* A Host header is at most a 253-character name and a port; anything longer is not ours. */
#define API_GUARD_HOST_MAX 300

bool api_guard_is_loopback(const char *ip)
{
    struct in_addr v4;
    struct in6_addr v6;
    if (ip == NULL)
        return false;
    if (inet_pton(AF_INET, ip, &v4) == 1)
        return (ntohl(v4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, ip, &v6) == 1)
        return IN6_IS_ADDR_LOOPBACK(&v6) || (IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127);
    return false;
}

/* Splits "name", "name:port", "[v6]" or "[v6]:port" and copies the host part (brackets
 * removed) into host; *portp (when not NULL) gets the port's text, or NULL when there is
 * none. The port, when present, must be 1 to 5 digits. Returns 0 or -1. */
static int api_guard_split_port(const char *hostport, char *host, size_t hostlen,
                                const char **portp)
{
    size_t n = strlen(hostport);
    if (n == 0 || n > API_GUARD_HOST_MAX)
        return -1;
    const char *h = hostport, *end, *port;
    if (hostport[0] == '[') {
        end = strchr(hostport, ']');
        if (end == NULL)
            return -1;
        h = hostport + 1;
        if (end[1] != '\0' && end[1] != ':')
            return -1;
        port = end[1] == ':' ? end + 2 : NULL;
    } else {
        end = strchr(hostport, ':');
        /* A bare IPv6 address has several colons and no brackets: not a valid Host. */
        if (end != NULL && strchr(end + 1, ':') != NULL)
            return -1;
        port = end != NULL ? end + 1 : NULL;
        if (end == NULL)
            end = hostport + n;
    }
    if (port != NULL) {
        size_t digits = strspn(port, "0123456789");
        if (digits == 0 || digits > 5 || port[digits] != '\0')
            return -1;
    }
    if (portp != NULL)
        *portp = port;
    size_t len = (size_t)(end - h);
    if (len == 0 || len >= hostlen)
        return -1;
    memcpy(host, h, len);
    host[len] = '\0';
    /* Brackets hold an IPv6 literal, never a name. */
    unsigned char v6[16];
    if (h != hostport && inet_pton(AF_INET6, host, v6) != 1)
        return -1;
    return 0;
}

static int api_guard_split(const char *hostport, char *host, size_t hostlen)
{
    return api_guard_split_port(hostport, host, hostlen, NULL);
}

/* Same host: equal addresses for IP literals (so "::1" matches "0:0::1"), else names equal
 * ignoring case. */
static bool api_guard_same_host(const char *a, const char *b)
{
    unsigned char x[16], y[16];
    if (inet_pton(AF_INET, a, x) == 1)
        return inet_pton(AF_INET, b, y) == 1 && memcmp(x, y, 4) == 0;
    if (inet_pton(AF_INET6, a, x) == 1)
        return inet_pton(AF_INET6, b, y) == 1 && memcmp(x, y, 16) == 0;
    return strcasecmp(a, b) == 0;
}

static bool api_guard_listed(const struct config *cfg, const char *host)
{
    for (size_t i = 0; i < cfg->allowed_hosts_len; i++)
        if (api_guard_same_host(cfg->allowed_hosts[i], host))
            return true;
    return false;
}

bool api_guard_host_ok(const struct config *cfg, const char *hostport)
{
    char host[API_GUARD_HOST_MAX + 1];
    if (hostport == NULL)
        return true;
    if (api_guard_split(hostport, host, sizeof(host)) != 0)
        return false;
    return api_guard_is_loopback(host) || strcasecmp(host, "localhost") == 0 ||
           api_guard_same_host(cfg->api_listen_addr, host) || api_guard_listed(cfg, host);
}

bool api_guard_origin_ok(const struct config *cfg, const char *origin, const char *hostport,
                         const char *sec_fetch_site)
{
    if (sec_fetch_site != NULL && strcasecmp(sec_fetch_site, "cross-site") == 0)
        return false;
    if (origin == NULL)
        return true;
    /* An origin is scheme://host[:port] and nothing else; "null" (sandboxed frames,
     * file: pages) and anything with a path are foreign. */
    const char *auth = strncasecmp(origin, "http://", 7) == 0    ? origin + 7
                       : strncasecmp(origin, "https://", 8) == 0 ? origin + 8
                                                                  : NULL;
    if (auth == NULL || strpbrk(auth, "/?#@") != NULL)
        return false;
    if (hostport != NULL && strcasecmp(auth, hostport) == 0)
        return true;
    /* A proxy that rewrites Host leaves the browser's Origin: a name in allowed_hosts is
     * ours on its scheme's default port only. Another port of that name is another
     * origin, and may be one of this server's own mapped ports serving any page. */
    char host[API_GUARD_HOST_MAX + 1];
    const char *port;
    if (api_guard_split_port(auth, host, sizeof(host), &port) != 0 || !api_guard_listed(cfg, host))
        return false;
    if (port == NULL)
        return true;
    unsigned long n = strtoul(port, NULL, 10);
    return n == (auth == origin + 8 ? 443ul : 80ul);
}

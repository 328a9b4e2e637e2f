#include "proxy_header.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static const unsigned char proxy_v2_sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                                0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

/* One endpoint reduced to what a header carries. */
struct proxy_ep {
    int family; /* AF_INET, AF_INET6, or 0 when neither */
    unsigned char addr[16];
    uint16_t port; /* host order */
};

static void proxy_ep_from(const struct sockaddr *sa, struct proxy_ep *ep)
{
    memset(ep, 0, sizeof(*ep));
    if (sa && sa->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        ep->family = AF_INET;
        memcpy(ep->addr, &sin->sin_addr, 4);
        ep->port = ntohs(sin->sin_port);
    } else if (sa && sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        ep->port = ntohs(sin6->sin6_port);
        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
            ep->family = AF_INET;
            memcpy(ep->addr, sin6->sin6_addr.s6_addr + 12, 4);
        } else {
            ep->family = AF_INET6;
            memcpy(ep->addr, &sin6->sin6_addr, 16);
        }
    }
}

static int proxy_v1(const struct proxy_ep *s, const struct proxy_ep *d, unsigned char *buf)
{
    char sa[INET6_ADDRSTRLEN], da[INET6_ADDRSTRLEN];
    int n;
    if (s->family == 0 || s->family != d->family) {
        n = snprintf((char *)buf, PROXY_HEADER_MAX, "PROXY UNKNOWN\r\n");
    } else {
        inet_ntop(s->family, s->addr, sa, sizeof(sa));
        inet_ntop(d->family, d->addr, da, sizeof(da));
        n = snprintf((char *)buf, PROXY_HEADER_MAX, "PROXY %s %s %s %u %u\r\n",
                     s->family == AF_INET ? "TCP4" : "TCP6", sa, da, (unsigned)s->port,
                     (unsigned)d->port);
    }
    return n;
}

static int proxy_v2(const struct proxy_ep *s, const struct proxy_ep *d, unsigned char *buf)
{
    memcpy(buf, proxy_v2_sig, sizeof(proxy_v2_sig));
    unsigned char *p = buf + sizeof(proxy_v2_sig);
    if (s->family == 0 || s->family != d->family) {
        /* LOCAL: the receiver uses the connection's own addresses. */
        *p++ = 0x20;
        *p++ = 0x00;
        *p++ = 0;
        *p++ = 0;
        return (int)(p - buf);
    }
    size_t alen = s->family == AF_INET ? 4 : 16;
    *p++ = 0x21;                                  /* version 2, PROXY */
    *p++ = s->family == AF_INET ? 0x11 : 0x21;    /* TCP over IPv4 / IPv6 */
    uint16_t len = (uint16_t)(2 * alen + 4);
    *p++ = (unsigned char)(len >> 8);
    *p++ = (unsigned char)len;
    memcpy(p, s->addr, alen);
    p += alen;
    memcpy(p, d->addr, alen);
    p += alen;
    *p++ = (unsigned char)(s->port >> 8);
    *p++ = (unsigned char)s->port;
    *p++ = (unsigned char)(d->port >> 8);
    *p++ = (unsigned char)d->port;
    return (int)(p - buf);
}

int proxy_header_build(int version, const struct sockaddr *src, const struct sockaddr *dst,
                       unsigned char *buf)
{
    struct proxy_ep s, d;
    proxy_ep_from(src, &s);
    proxy_ep_from(dst, &d);
    if (version == 1)
        return proxy_v1(&s, &d, buf);
    if (version == 2)
        return proxy_v2(&s, &d, buf);
    return -1;
}

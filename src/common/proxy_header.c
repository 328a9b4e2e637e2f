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

/* ---- receiving (a balancer in front of us) ---- */

#define PROXY_V1_MAX 107 /* "PROXY TCP6 " + two addresses + two ports + CRLF, at most */

static int proxy_port_parse(const char *s, size_t n, uint16_t *out)
{
    if (n == 0 || n > 5)
        return -1;
    unsigned v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    if (v > 65535)
        return -1;
    *out = (uint16_t)v;
    return 0;
}

static void proxy_sockaddr(int family, const unsigned char *addr, uint16_t port,
                           struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(*ss));
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        sin->sin_family = AF_INET;
        memcpy(&sin->sin_addr, addr, 4);
        sin->sin_port = htons(port);
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        sin6->sin6_family = AF_INET6;
        memcpy(&sin6->sin6_addr, addr, 16);
        sin6->sin6_port = htons(port);
    }
}

/* The four fields after "TCP4 " / "TCP6 ": "src dst sport dport", single spaces. */
static int proxy_v1_fields(int family, const char *p, size_t n, struct proxy_header_info *out)
{
    const char *field[4];
    size_t flen[4];
    size_t k = 0, start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || p[i] == ' ') {
            if (k == 4 || i == start)
                return -1;
            field[k] = p + start;
            flen[k++] = i - start;
            start = i + 1;
        }
    }
    if (k != 4)
        return -1;
    unsigned char sa[16], da[16];
    char text[INET6_ADDRSTRLEN];
    for (int i = 0; i < 2; i++) {
        if (flen[i] >= sizeof(text))
            return -1;
        memcpy(text, field[i], flen[i]);
        text[flen[i]] = '\0';
        if (inet_pton(family, text, i == 0 ? sa : da) != 1)
            return -1;
    }
    uint16_t sp, dp;
    if (proxy_port_parse(field[2], flen[2], &sp) != 0 ||
        proxy_port_parse(field[3], flen[3], &dp) != 0)
        return -1;
    proxy_sockaddr(family, sa, sp, &out->src);
    proxy_sockaddr(family, da, dp, &out->dst);
    return 0;
}

static long proxy_v1_parse(const unsigned char *buf, size_t len, struct proxy_header_info *out)
{
    size_t end = 0; /* index of the LF */
    size_t scan = len < PROXY_V1_MAX ? len : PROXY_V1_MAX;
    for (size_t i = 0; i < scan && !end; i++) {
        if (buf[i] == '\n') {
            if (i == 0 || buf[i - 1] != '\r')
                return -1;
            end = i;
        } else if (buf[i] == '\r' ? i + 1 < scan && buf[i + 1] != '\n'
                                  : buf[i] < 0x20 || buf[i] > 0x7e) {
            return -1; /* nothing but printable text, and CR only before LF */
        }
    }
    if (!end)
        return len >= PROXY_V1_MAX ? -1 : 0;
    const char *p = (const char *)buf + 6; /* after "PROXY " */
    size_t n = end - 1 - 6;                /* up to the CR */
    memset(out, 0, sizeof(*out));
    if (n >= 7 && memcmp(p, "UNKNOWN", 7) == 0 && (n == 7 || p[7] == ' '))
        return (long)end + 1;
    if (n < 5 || p[4] != ' ')
        return -1;
    int family;
    if (memcmp(p, "TCP4", 4) == 0)
        family = AF_INET;
    else if (memcmp(p, "TCP6", 4) == 0)
        family = AF_INET6;
    else
        return -1;
    if (proxy_v1_fields(family, p + 5, n - 5, out) != 0)
        return -1;
    return (long)end + 1;
}

static long proxy_v2_parse(const unsigned char *buf, size_t len, struct proxy_header_info *out)
{
    if (len < 16)
        return 0;
    unsigned version = buf[12] >> 4, command = buf[12] & 0x0f;
    unsigned family = buf[13] >> 4, transport = buf[13] & 0x0f;
    size_t body = (size_t)buf[14] << 8 | buf[15];
    /* The spec's list: UNSPEC with UNSPEC, or INET, INET6, UNIX with STREAM or DGRAM. */
    if (version != 2 || command > 1 || family > 3 || transport > 2 ||
        (family == 0) != (transport == 0))
        return -1;
    memset(out, 0, sizeof(*out));
    /* LOCAL (the balancer's own connection, a health check), and anything but TCP over
     * IPv4 or IPv6: no client address to take. */
    if (command == 0 || transport != 1 || (family != 1 && family != 2))
        return (long)(16 + body);
    size_t alen = family == 1 ? 4 : 16;
    if (body < 2 * alen + 4)
        return -1;
    if (len < 16 + 2 * alen + 4)
        return 0;
    const unsigned char *a = buf + 16;
    int af = family == 1 ? AF_INET : AF_INET6;
    uint16_t sp = (uint16_t)(a[2 * alen] << 8 | a[2 * alen + 1]);
    uint16_t dp = (uint16_t)(a[2 * alen + 2] << 8 | a[2 * alen + 3]);
    proxy_sockaddr(af, a, sp, &out->src);
    proxy_sockaddr(af, a + alen, dp, &out->dst);
    return (long)(16 + body);
}

long proxy_header_parse(const unsigned char *buf, size_t len, struct proxy_header_info *out)
{
    static const char v1_sig[6] = "PROXY ";
    if (len == 0)
        return 0;
    if (buf[0] == 'P') {
        size_t n = len < sizeof(v1_sig) ? len : sizeof(v1_sig);
        if (memcmp(buf, v1_sig, n) != 0)
            return -1;
        return len < sizeof(v1_sig) ? 0 : proxy_v1_parse(buf, len, out);
    }
    size_t n = len < sizeof(proxy_v2_sig) ? len : sizeof(proxy_v2_sig);
    if (memcmp(buf, proxy_v2_sig, n) != 0)
        return -1;
    return proxy_v2_parse(buf, len, out);
}

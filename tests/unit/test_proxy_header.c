/* proxy_header_parse: what a balancer in front of us sends (trusted_proxies). Every header
 * proxy_header_build writes reads back to its addresses; every proper prefix of a header
 * asks for more; what is not a header is refused as early as its bytes show it. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "check.h"
#include "proxy_header.h"

static struct sockaddr_in v4(const char *ip, int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, ip, &a.sin_addr);
    return a;
}

static struct sockaddr_in6 v6(const char *ip, int port)
{
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
    inet_pton(AF_INET6, ip, &a.sin6_addr);
    return a;
}

static long parse_text(const char *s, struct proxy_header_info *info)
{
    return proxy_header_parse((const unsigned char *)s, strlen(s), info);
}

/* Every proper prefix of buf[0..len) is a "need more", never a verdict. */
static int prefixes_need_more(const unsigned char *buf, size_t len)
{
    struct proxy_header_info info;
    for (size_t i = 0; i < len; i++)
        if (proxy_header_parse(buf, i, &info) != 0)
            return 0;
    return 1;
}

static void test_round_trip(void)
{
    struct sockaddr_in s4 = v4("203.0.113.7", 51234), d4 = v4("10.0.0.2", 10022);
    struct sockaddr_in6 s6 = v6("2001:db8::7", 443), d6 = v6("2001:db8::1", 65535);
    for (int version = 1; version <= 2; version++) {
        unsigned char buf[PROXY_HEADER_MAX + 8];
        struct proxy_header_info info;
        int n = proxy_header_build(version, (struct sockaddr *)&s4, (struct sockaddr *)&d4, buf);
        CHECK(n > 0 && proxy_header_parse(buf, (size_t)n, &info) == n);
        CHECK(info.src.ss_family == AF_INET && memcmp(&info.src, &s4, sizeof(s4)) == 0);
        CHECK(info.dst.ss_family == AF_INET && memcmp(&info.dst, &d4, sizeof(d4)) == 0);
        CHECK(prefixes_need_more(buf, (size_t)n));
        /* The client's bytes after the header are not the header's. */
        memcpy(buf + n, "GET /", 5);
        CHECK(proxy_header_parse(buf, (size_t)n + 5, &info) == n);

        n = proxy_header_build(version, (struct sockaddr *)&s6, (struct sockaddr *)&d6, buf);
        CHECK(n > 0 && proxy_header_parse(buf, (size_t)n, &info) == n);
        CHECK(info.src.ss_family == AF_INET6 && memcmp(&info.src, &s6, sizeof(s6)) == 0);
        CHECK(info.dst.ss_family == AF_INET6 && memcmp(&info.dst, &d6, sizeof(d6)) == 0);
        CHECK(prefixes_need_more(buf, (size_t)n));

        /* Mixed families: UNKNOWN (v1) / LOCAL (v2), which name nobody. */
        n = proxy_header_build(version, (struct sockaddr *)&s4, (struct sockaddr *)&d6, buf);
        CHECK(n > 0 && proxy_header_parse(buf, (size_t)n, &info) == n);
        CHECK(info.src.ss_family == AF_UNSPEC);
    }
}

static void test_v1(void)
{
    struct proxy_header_info info;
    CHECK(parse_text("PROXY TCP4 192.0.2.1 192.0.2.2 0 65535\r\n", &info) == 40);
    CHECK(parse_text("PROXY UNKNOWN\r\n", &info) == 15 && info.src.ss_family == AF_UNSPEC);
    CHECK(parse_text("PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nxyz", &info) == 35 &&
          info.src.ss_family == AF_UNSPEC);
    /* The longest header the spec allows (107 bytes) still reads. */
    const char *longest = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                          "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    CHECK(strlen(longest) == 104 && parse_text(longest, &info) == 104);
    const char *bad[] = {
        "PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",       /* LF without CR */
        "PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",       /* a field short */
        "PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n",   /* a field long */
        "PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n",    /* two spaces */
        "PROXY TCP4 192.0.2.1 192.0.2.2 1 65536\r\n", /* port out of range */
        "PROXY TCP4 192.0.2.1 192.0.2.2 1 -2\r\n",
        "PROXY TCP4 ::1 ::2 1 2\r\n",                 /* family and addresses disagree */
        "PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n",
        "PROXY TCP4 192.0.2.256 192.0.2.2 1 2\r\n",
        "PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
        "PROXY \r\n",
        "PROXY UNKNOWNX\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",          /* CR not before LF */
        "PROXY TCP4 1.2.3.4\x01",                     /* a control character */
        "PROXZ",                                      /* refused at its fifth byte */
        "GET / HTTP/1.1\r\n",
        "\x16\x03\x01",                               /* a TLS ClientHello */
        "{\"type\":\"hello\"}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        long r = parse_text(bad[i], &info);
        if (r != -1)
            fprintf(stderr, "accepted bad header %zu: %ld\n", i, r);
        CHECK(r == -1);
    }
    /* No end of line within 107 bytes: refused, not waited for. */
    char line[200] = "PROXY UNKNOWN ";
    memset(line + 14, 'a', 120);
    line[134] = '\0';
    CHECK(proxy_header_parse((const unsigned char *)line, 106, &info) == 0);
    CHECK(proxy_header_parse((const unsigned char *)line, 107, &info) == -1);
    CHECK(parse_text("PROXY TCP4 1.2.3.4", &info) == 0);
    CHECK(parse_text("PROX", &info) == 0);
}

static void test_v2(void)
{
    static const unsigned char sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                          0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};
    unsigned char buf[300];
    struct proxy_header_info info;
    memcpy(buf, sig, 12);
    /* TCP4 with 20 bytes of TLVs after the addresses: the length counts them, and the
     * addresses are known before they arrive. */
    buf[12] = 0x21;
    buf[13] = 0x11;
    buf[14] = 0;
    buf[15] = 12 + 20;
    unsigned char addrs[12] = {198, 51, 100, 9, 10, 0, 0, 1, 0x30, 0x39, 0x00, 0x50};
    memcpy(buf + 16, addrs, 12);
    CHECK(proxy_header_parse(buf, 27, &info) == 0);
    CHECK(proxy_header_parse(buf, 28, &info) == 48);
    struct sockaddr_in want = v4("198.51.100.9", 12345);
    CHECK(memcmp(&info.src, &want, sizeof(want)) == 0);
    /* LOCAL (a health check): no address, whatever the family says. */
    buf[12] = 0x20;
    CHECK(proxy_header_parse(buf, 16, &info) == 48 && info.src.ss_family == AF_UNSPEC);
    /* UNIX sockets and UDP name no TCP client either. */
    buf[12] = 0x21;
    buf[13] = 0x31;
    CHECK(proxy_header_parse(buf, 16, &info) == 48 && info.src.ss_family == AF_UNSPEC);
    buf[13] = 0x12;
    CHECK(proxy_header_parse(buf, 16, &info) == 48 && info.src.ss_family == AF_UNSPEC);
    /* A body too short for the addresses it claims, a wrong version, an unknown command,
     * family or transport, a broken signature. */
    buf[13] = 0x21;
    buf[15] = 35;
    CHECK(proxy_header_parse(buf, 16, &info) == -1);
    buf[13] = 0x11;
    buf[15] = 11;
    CHECK(proxy_header_parse(buf, 16, &info) == -1);
    buf[15] = 12;
    buf[12] = 0x11;
    CHECK(proxy_header_parse(buf, 16, &info) == -1);
    buf[12] = 0x22;
    CHECK(proxy_header_parse(buf, 16, &info) == -1);
    buf[12] = 0x21;
    buf[13] = 0x41;
    CHECK(proxy_header_parse(buf, 16, &info) == -1);
    buf[13] = 0x13;
    CHECK(proxy_header_parse(buf, 16, &info) == -1);
    /* A family without a transport, or the reverse: not on the spec's list. */
    const unsigned char unlisted[] = {0x01, 0x02, 0x10, 0x20, 0x30};
    for (size_t i = 0; i < sizeof(unlisted); i++) {
        buf[13] = unlisted[i];
        CHECK(proxy_header_parse(buf, 16, &info) == -1);
    }
    buf[13] = 0x00; /* UNSPEC: names no client */
    CHECK(proxy_header_parse(buf, 16, &info) == 28 && info.src.ss_family == AF_UNSPEC);
    buf[13] = 0x11;
    CHECK(proxy_header_parse(buf, 28, &info) == 28);
    buf[7] = 0x52;
    CHECK(proxy_header_parse(buf, 8, &info) == -1);
    CHECK(proxy_header_parse(buf, 7, &info) == 0);
    /* The largest length the field holds is a length, not a buffer to fill. */
    buf[7] = 0x51;
    buf[14] = 0xff;
    buf[15] = 0xff;
    CHECK(proxy_header_parse(buf, 28, &info) == 16 + 65535);
}

int main(void)
{
    test_round_trip();
    test_v1();
    test_v2();
    return check_summary();
}

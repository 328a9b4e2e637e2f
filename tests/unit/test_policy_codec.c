/* The pure pieces of the mapping policy: PROXY protocol headers (haproxy's spec, byte for
 * byte), the token bucket behind rate_limit (time passed in, no sleeping), and the
 * canonical CIDR text that allow_from is stored and listed as. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "check.h"
#include "netaddr.h"
#include "proxy_header.h"
#include "token_bucket.h"

#define NS 1000000000ull

static struct sockaddr_storage v4(const char *ip, uint16_t port)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    inet_pton(AF_INET, ip, &sin->sin_addr);
    return ss;
}

static struct sockaddr_storage v6(const char *ip, uint16_t port)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(port);
    inet_pton(AF_INET6, ip, &sin6->sin6_addr);
    return ss;
}

#define SA(x) ((const struct sockaddr *)&(x))

static void test_v1(void)
{
    unsigned char buf[PROXY_HEADER_MAX];
    struct sockaddr_storage s = v4("192.0.2.1", 56324), d = v4("198.51.100.7", 443);
    int n = proxy_header_build(1, SA(s), SA(d), buf);
    const char *want = "PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n";
    CHECK(n == (int)strlen(want) && memcmp(buf, want, (size_t)n) == 0);

    s = v6("2001:db8::1", 1);
    d = v6("::1", 65535);
    n = proxy_header_build(1, SA(s), SA(d), buf);
    want = "PROXY TCP6 2001:db8::1 ::1 1 65535\r\n";
    CHECK(n == (int)strlen(want) && memcmp(buf, want, (size_t)n) == 0);

    /* A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: still TCP4. */
    s = v6("::ffff:10.1.2.3", 1000);
    d = v6("::ffff:127.0.0.1", 2000);
    n = proxy_header_build(1, SA(s), SA(d), buf);
    want = "PROXY TCP4 10.1.2.3 127.0.0.1 1000 2000\r\n";
    CHECK(n == (int)strlen(want) && memcmp(buf, want, (size_t)n) == 0);

    /* Mixed families cannot be described: UNKNOWN, as the spec asks. */
    s = v4("10.0.0.1", 1);
    d = v6("::1", 2);
    n = proxy_header_build(1, SA(s), SA(d), buf);
    CHECK(n == 15 && memcmp(buf, "PROXY UNKNOWN\r\n", 15) == 0);

    /* The longest v1 header fits the buffer. */
    s = v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535);
    d = v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535);
    n = proxy_header_build(1, SA(s), SA(d), buf);
    CHECK(n > 0 && n <= PROXY_HEADER_MAX && memcmp(buf + n - 2, "\r\n", 2) == 0);
    CHECK(proxy_header_build(3, SA(s), SA(d), buf) == -1);
}

static void test_v2(void)
{
    static const unsigned char sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                          0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};
    unsigned char buf[PROXY_HEADER_MAX];
    struct sockaddr_storage s = v4("192.0.2.1", 0x1234), d = v4("198.51.100.7", 443);
    int n = proxy_header_build(2, SA(s), SA(d), buf);
    static const unsigned char want4[] = {0x21, 0x11, 0x00, 0x0C, 192, 0, 2, 1, 198, 51,
                                          100, 7, 0x12, 0x34, 0x01, 0xBB};
    CHECK(n == 28 && memcmp(buf, sig, 12) == 0 && memcmp(buf + 12, want4, 16) == 0);

    s = v6("::1", 80);
    d = v6("2001:db8::2", 8080);
    n = proxy_header_build(2, SA(s), SA(d), buf);
    CHECK(n == 52 && buf[12] == 0x21 && buf[13] == 0x21 && buf[14] == 0 && buf[15] == 36);
    CHECK(buf[16 + 15] == 1 && buf[32] == 0x20 && buf[33] == 0x01);
    CHECK(buf[48] == 0 && buf[49] == 80 && buf[50] == 0x1F && buf[51] == 0x90);

    s = v6("::ffff:10.1.2.3", 1);
    d = v4("127.0.0.1", 2);
    n = proxy_header_build(2, SA(s), SA(d), buf);
    CHECK(n == 28 && buf[13] == 0x11 && buf[16] == 10 && buf[19] == 3);

    /* Unknown addresses: LOCAL with no address block. */
    struct sockaddr_storage none;
    memset(&none, 0, sizeof(none));
    n = proxy_header_build(2, SA(none), SA(d), buf);
    CHECK(n == 16 && buf[12] == 0x20 && buf[13] == 0 && buf[14] == 0 && buf[15] == 0);
}

static void test_token_bucket(void)
{
    struct token_bucket tb;
    memset(&tb, 0, sizeof(tb));
    /* Unlimited: everything, always, and no waiting. */
    CHECK(token_bucket_available(&tb, 1 << 20, 0) == 1 << 20);
    CHECK(token_bucket_wait_ns(&tb, 1 << 20) == 0);

    uint64_t t = 5 * NS;
    token_bucket_set_rate(&tb, 1000000, t);     /* 1 MB/s: a quarter second of burst */
    CHECK(tb.capacity == 250000);
    CHECK(token_bucket_available(&tb, 1 << 20, t) == 250000);
    token_bucket_take(&tb, 250000);
    CHECK(token_bucket_available(&tb, 1 << 20, t) == 0);
    CHECK(token_bucket_wait_ns(&tb, 16384) == 16384000 + 1);
    /* 10 ms later: 10 000 bytes. */
    CHECK(token_bucket_available(&tb, 1 << 20, t + NS / 100) == 10000);
    token_bucket_take(&tb, 10000);
    /* An hour idle fills no more than the capacity. */
    CHECK(token_bucket_available(&tb, 1 << 20, t + 3600 * NS) == 250000);
    /* Over a simulated 10 s, takers get rate * time plus at most the burst. */
    memset(&tb, 0, sizeof(tb));
    token_bucket_set_rate(&tb, 1000000, 0);
    uint64_t moved = 0;
    for (uint64_t now = 0; now <= 10 * NS; now += NS / 1000) {
        uint64_t n = token_bucket_available(&tb, 65536, now);
        token_bucket_take(&tb, n);
        moved += n;
    }
    CHECK(moved >= 10000000 && moved <= 10250000);
    /* Slow rates still earn tokens over many small steps. */
    memset(&tb, 0, sizeof(tb));
    token_bucket_set_rate(&tb, 3, 0);
    token_bucket_take(&tb, token_bucket_available(&tb, 100, 0));
    uint64_t got = 0;
    for (uint64_t now = 0; now <= 2 * NS; now += NS / 1000) {
        uint64_t n = token_bucket_available(&tb, 100, now);
        token_bucket_take(&tb, n);
        got += n;
    }
    CHECK(got == 6);
    /* Changing the rate keeps tokens but caps them by the new capacity. */
    memset(&tb, 0, sizeof(tb));
    token_bucket_set_rate(&tb, 1000000, 0);
    token_bucket_set_rate(&tb, 4000, 0);
    CHECK(tb.capacity == 1000 && token_bucket_available(&tb, 1 << 20, 0) == 1000);
    token_bucket_set_rate(&tb, 0, 0);
    CHECK(token_bucket_available(&tb, 1 << 20, 0) == 1 << 20);
}

static void test_cidr_format(void)
{
    char buf[64];
    struct netaddr_cidr c;
    CHECK(netaddr_cidr_parse("10.1.2.3/8", &c) == 0);
    CHECK(strcmp(netaddr_cidr_format(&c, buf, sizeof(buf)), "10.0.0.0/8") == 0);
    CHECK(netaddr_cidr_parse("127.0.0.2", &c) == 0);
    CHECK(strcmp(netaddr_cidr_format(&c, buf, sizeof(buf)), "127.0.0.2/32") == 0);
    CHECK(netaddr_cidr_parse("2001:DB8::1/32", &c) == 0);
    CHECK(strcmp(netaddr_cidr_format(&c, buf, sizeof(buf)), "2001:db8::/32") == 0);
    CHECK(netaddr_cidr_parse("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", &c) == 0);
    CHECK(strlen(netaddr_cidr_format(&c, buf, sizeof(buf))) < 50);
}

int main(void)
{
    test_v1();
    test_v2();
    test_token_bucket();
    test_cidr_format();
    return check_summary();
}

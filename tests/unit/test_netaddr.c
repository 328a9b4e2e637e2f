/* Unit tests for netaddr: CIDR parse/match, IP literals to socket addresses, host:port
 * splitting, formatting. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "netaddr.h"

static struct sockaddr_storage v4(const char *ip, int port)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *in = (struct sockaddr_in *)&ss;
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, ip, &in->sin_addr) != 1)
        fprintf(stderr, "bad test address %s\n", ip);
    return ss;
}

static struct sockaddr_storage v6(const char *ip, int port)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    if (inet_pton(AF_INET6, ip, &in6->sin6_addr) != 1)
        fprintf(stderr, "bad test address %s\n", ip);
    return ss;
}

/* Parses cidr and tells whether sa matches it; false when the CIDR does not parse. */
static bool matches(const char *cidr, struct sockaddr_storage ss)
{
    struct netaddr_cidr c;
    if (netaddr_cidr_parse(cidr, &c) != 0)
        return false;
    return netaddr_cidr_match(&c, (const struct sockaddr *)&ss);
}

static void test_cidr_parse(void)
{
    struct netaddr_cidr c;
    CHECK(netaddr_cidr_parse("10.0.0.0/8", &c) == 0);
    CHECK(c.family == AF_INET && c.prefix == 8 && c.addr[0] == 10);
    CHECK(netaddr_cidr_parse("127.0.0.1", &c) == 0);
    CHECK(c.family == AF_INET && c.prefix == 32 && c.addr[3] == 1);
    CHECK(netaddr_cidr_parse("::1", &c) == 0);
    CHECK(c.family == AF_INET6 && c.prefix == 128 && c.addr[15] == 1);
    CHECK(netaddr_cidr_parse("fd00::/8", &c) == 0);
    CHECK(c.family == AF_INET6 && c.prefix == 8 && c.addr[0] == 0xfd);
    CHECK(netaddr_cidr_parse("0.0.0.0/0", &c) == 0 && c.prefix == 0);
    CHECK(netaddr_cidr_parse("::/0", &c) == 0 && c.prefix == 0);
    /* Host bits beyond the prefix are ignored (cleared). */
    CHECK(netaddr_cidr_parse("192.168.1.77/24", &c) == 0);
    CHECK(c.addr[2] == 1 && c.addr[3] == 0);
    CHECK(netaddr_cidr_parse("10.255.0.0/9", &c) == 0 && c.addr[1] == 0x80);

    const char *bad[] = {"10.0.0.0/33", "::/129", "1.2.3", "", "10.0.0.0/", "::1/x",
                         "10.0.0.0/-1", "10.0.0.0/8/8", "10.0.0.0 /8", "10.0.0.0/ 8",
                         "abc", "1.2.3.4.5", "10.0.0.0/1000", "fd00::/8x", "/8",
                         "1.2.3.4/+8", "::1 ", "[::1]"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (netaddr_cidr_parse(bad[i], &c) != -1)
            fprintf(stderr, "accepted bad CIDR \"%s\"\n", bad[i]);
        CHECK(netaddr_cidr_parse(bad[i], &c) == -1);
    }
    char longs[300];
    memset(longs, '1', sizeof(longs) - 1);
    longs[sizeof(longs) - 1] = '\0';
    CHECK(netaddr_cidr_parse(longs, &c) == -1);
    CHECK(netaddr_cidr_parse(NULL, &c) == -1);
}

static void test_cidr_match(void)
{
    CHECK(matches("10.0.0.0/8", v4("10.1.2.3", 1)));
    CHECK(!matches("10.0.0.0/8", v4("11.0.0.1", 1)));
    CHECK(matches("192.168.1.0/24", v4("192.168.1.255", 1)));
    CHECK(!matches("192.168.1.0/24", v4("192.168.2.0", 1)));
    CHECK(matches("10.128.0.0/9", v4("10.200.0.1", 1)));
    CHECK(!matches("10.128.0.0/9", v4("10.127.0.1", 1)));
    CHECK(matches("127.0.0.1", v4("127.0.0.1", 1)));
    CHECK(!matches("127.0.0.1", v4("127.0.0.2", 1)));
    CHECK(matches("0.0.0.0/0", v4("8.8.8.8", 1)));
    CHECK(matches("::1", v6("::1", 1)));
    CHECK(!matches("::1", v6("::2", 1)));
    CHECK(matches("fd00::/8", v6("fd12:3456::1", 1)));
    CHECK(!matches("fd00::/8", v6("fe80::1", 1)));
    CHECK(matches("2001:db8::/33", v6("2001:db8:7fff::1", 1)));
    CHECK(!matches("2001:db8::/33", v6("2001:db8:8000::1", 1)));
    /* A dual-stack listener sees v4 peers as ::ffff:a.b.c.d; v4 rules must apply. */
    CHECK(matches("127.0.0.0/8", v6("::ffff:127.0.0.1", 1)));
    CHECK(!matches("10.0.0.0/8", v6("::ffff:127.0.0.1", 1)));
    CHECK(matches("::ffff:0:0/96", v4("1.2.3.4", 1)));
    /* Families do not otherwise mix. */
    CHECK(!matches("0.0.0.0/0", v6("::1", 1)));
    /* ...except that ::/0 covers ::ffff:0:0/96, as on a dual-stack socket. */
    CHECK(matches("::/0", v4("127.0.0.1", 1)));
    CHECK(!matches("fd00::/8", v4("127.0.0.1", 1)));
    struct sockaddr_storage unix_like;
    memset(&unix_like, 0, sizeof(unix_like));
    unix_like.ss_family = AF_UNIX;
    CHECK(!matches("0.0.0.0/0", unix_like));
    CHECK(!netaddr_cidr_match(NULL, NULL));
}

static void test_literals(void)
{
    CHECK(netaddr_is_ip_literal("127.0.0.1"));
    CHECK(netaddr_is_ip_literal("::1"));
    CHECK(netaddr_is_ip_literal("fe80::1:2"));
    CHECK(!netaddr_is_ip_literal("localhost"));
    CHECK(!netaddr_is_ip_literal("1.2.3"));
    CHECK(!netaddr_is_ip_literal(""));
    CHECK(!netaddr_is_ip_literal("[::1]"));
    CHECK(!netaddr_is_ip_literal(NULL));

    CHECK(netaddr_is_hostname("localhost"));
    CHECK(netaddr_is_hostname("db-1.internal.example.com"));
    CHECK(netaddr_is_hostname("a"));
    CHECK(!netaddr_is_hostname(""));
    CHECK(!netaddr_is_hostname("-a.com"));
    CHECK(!netaddr_is_hostname("a-.com"));
    CHECK(!netaddr_is_hostname("a..b"));
    CHECK(!netaddr_is_hostname(".a"));
    CHECK(!netaddr_is_hostname("a b"));
    CHECK(!netaddr_is_hostname("a_b"));
    CHECK(!netaddr_is_hostname("::1"));
    CHECK(!netaddr_is_hostname(NULL));
    char label[70];
    memset(label, 'a', 64);
    label[64] = '\0';
    CHECK(!netaddr_is_hostname(label));
    label[63] = '\0';
    CHECK(netaddr_is_hostname(label));
    char name[300];
    memset(name, 'a', sizeof(name) - 1);
    for (size_t i = 50; i < sizeof(name) - 1; i += 50)
        name[i] = '.';
    name[254] = '\0';
    CHECK(!netaddr_is_hostname(name));
    name[253] = '\0';
    CHECK(netaddr_is_hostname(name));
}

static void test_split(void)
{
    char host[64];
    uint16_t port = 0;
    CHECK(netaddr_split_host_port("127.0.0.1:22", host, sizeof(host), &port) == 0);
    CHECK(strcmp(host, "127.0.0.1") == 0 && port == 22);
    CHECK(netaddr_split_host_port("[::1]:8080", host, sizeof(host), &port) == 0);
    CHECK(strcmp(host, "::1") == 0 && port == 8080);
    CHECK(netaddr_split_host_port("[fd00::1]:65535", host, sizeof(host), &port) == 0);
    CHECK(strcmp(host, "fd00::1") == 0 && port == 65535);
    CHECK(netaddr_split_host_port("example.com:1", host, sizeof(host), &port) == 0);
    CHECK(strcmp(host, "example.com") == 0 && port == 1);

    const char *bad[] = {"127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
                         "127.0.0.1:99999", "127.0.0.1:-1", "127.0.0.1:+1", "127.0.0.1:8x",
                         "127.0.0.1: 80", ":80", "::1:80", "[::1]", "[::1]80", "[::1:80",
                         "[]:80", "a]:80", "[::1]:", "h:000080", ""};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        port = 7;
        if (netaddr_split_host_port(bad[i], host, sizeof(host), &port) != -1)
            fprintf(stderr, "accepted bad host:port \"%s\"\n", bad[i]);
        CHECK(netaddr_split_host_port(bad[i], host, sizeof(host), &port) == -1);
        CHECK(port == 7);
    }
    /* A host that does not fit the caller's buffer is refused, not truncated. */
    char tiny[4];
    CHECK(netaddr_split_host_port("abcd:80", tiny, sizeof(tiny), &port) == -1);
    CHECK(netaddr_split_host_port("abc:80", tiny, sizeof(tiny), &port) == 0);
    CHECK(strcmp(tiny, "abc") == 0 && port == 80);
}

static void test_format(void)
{
    char buf[64];
    struct sockaddr_storage a = v4("1.2.3.4", 80);
    CHECK(strcmp(netaddr_format((struct sockaddr *)&a, buf, sizeof(buf)), "1.2.3.4:80") == 0);
    a = v6("::1", 8080);
    CHECK(strcmp(netaddr_format((struct sockaddr *)&a, buf, sizeof(buf)), "[::1]:8080") == 0);
    a = v6("::ffff:10.0.0.1", 1);
    CHECK(strcmp(netaddr_format((struct sockaddr *)&a, buf, sizeof(buf)),
                 "[::ffff:10.0.0.1]:1") == 0);
    a = v6("2001:db8::1", 65535);
    CHECK(netaddr_format((struct sockaddr *)&a, buf, sizeof(buf)) == buf);
    CHECK(strcmp(buf, "[2001:db8::1]:65535") == 0);
    /* A short buffer truncates but stays a terminated string. */
    char small[6];
    a = v4("192.168.100.200", 1234);
    netaddr_format((struct sockaddr *)&a, small, sizeof(small));
    CHECK(strcmp(small, "192.1") == 0);
    a.ss_family = AF_UNIX;
    CHECK(strcmp(netaddr_format((struct sockaddr *)&a, buf, sizeof(buf)), "?") == 0);
}

static void test_ip_sockaddr(void)
{
    struct sockaddr_storage ss;
    socklen_t len = 0;
    char buf[64];
    CHECK(netaddr_ip_sockaddr("10.1.2.3", 5432, &ss, &len) == 0);
    CHECK(ss.ss_family == AF_INET && len == sizeof(struct sockaddr_in));
    CHECK(strcmp(netaddr_format((struct sockaddr *)&ss, buf, sizeof(buf)), "10.1.2.3:5432") == 0);
    CHECK(netaddr_ip_sockaddr("::1", 22, &ss, &len) == 0);
    CHECK(ss.ss_family == AF_INET6 && len == sizeof(struct sockaddr_in6));
    CHECK(strcmp(netaddr_format((struct sockaddr *)&ss, buf, sizeof(buf)), "[::1]:22") == 0);
    /* Host names go through DNS, not here. */
    CHECK(netaddr_ip_sockaddr("localhost", 22, &ss, &len) == -1);
    CHECK(netaddr_ip_sockaddr("[::1]", 22, &ss, &len) == -1);
    CHECK(netaddr_ip_sockaddr("1.2.3", 22, &ss, &len) == -1);
    CHECK(netaddr_ip_sockaddr(NULL, 22, &ss, &len) == -1);
}

static bool self_by_definition(const char *ip)
{
    struct sockaddr_storage ss;
    socklen_t len;
    CHECK(netaddr_ip_sockaddr(ip, 80, &ss, &len) == 0);
    return netaddr_is_self_by_definition((struct sockaddr *)&ss);
}

/* The forwarding-loop check's fixed part (SPEC §2 "No forwarding loops"). */
static void test_self_addresses(void)
{
    CHECK(self_by_definition("127.0.0.1"));
    CHECK(self_by_definition("127.0.0.2"));
    CHECK(self_by_definition("127.255.255.254"));
    CHECK(self_by_definition("::1"));
    CHECK(self_by_definition("::ffff:127.0.0.1"));
    CHECK(self_by_definition("::ffff:127.9.9.9"));
    CHECK(self_by_definition("0.0.0.0"));
    CHECK(self_by_definition("::"));
    CHECK(self_by_definition("::ffff:0.0.0.0"));
    CHECK(!self_by_definition("128.0.0.1"));
    CHECK(!self_by_definition("126.255.255.255"));
    CHECK(!self_by_definition("10.0.0.1"));
    CHECK(!self_by_definition("::2"));
    CHECK(!self_by_definition("::ffff:10.0.0.1"));
    CHECK(!self_by_definition("::127.0.0.1")); /* v4-compatible, not v4-mapped */
    CHECK(!self_by_definition("2001:db8::1"));
    CHECK(!netaddr_is_self_by_definition(NULL));

    CHECK(netaddr_is_localhost_name("localhost"));
    CHECK(netaddr_is_localhost_name("LOCALHOST"));
    CHECK(netaddr_is_localhost_name("LocalHost."));
    CHECK(netaddr_is_localhost_name("app.localhost"));
    CHECK(netaddr_is_localhost_name("a.b.LOCALHOST"));
    CHECK(!netaddr_is_localhost_name("localhost.example.com"));
    CHECK(!netaddr_is_localhost_name("notlocalhost"));
    CHECK(!netaddr_is_localhost_name(""));
    CHECK(!netaddr_is_localhost_name(NULL));

    /* Hosts the client needs no TLS for: this machine by definition, nothing looked up. */
    CHECK(netaddr_host_is_local("127.0.0.1"));
    CHECK(netaddr_host_is_local("127.3.2.1"));
    CHECK(netaddr_host_is_local("::1"));
    CHECK(netaddr_host_is_local("localhost"));
    CHECK(netaddr_host_is_local("tunnel.localhost"));
    CHECK(!netaddr_host_is_local("192.0.2.1"));
    CHECK(!netaddr_host_is_local("2001:db8::1"));
    CHECK(!netaddr_host_is_local("portmux.example.com"));
    CHECK(!netaddr_host_is_local("[::1]"));
    CHECK(!netaddr_host_is_local(""));
    CHECK(!netaddr_host_is_local(NULL));

    /* One key for both spellings of an IPv4 address. */
    struct sockaddr_storage a, b;
    socklen_t len;
    uint8_t ka[16], kb[16];
    CHECK(netaddr_ip_sockaddr("192.0.2.7", 1, &a, &len) == 0);
    CHECK(netaddr_ip_sockaddr("::ffff:192.0.2.7", 2, &b, &len) == 0);
    CHECK(netaddr_key((struct sockaddr *)&a, ka) == 0 && netaddr_key((struct sockaddr *)&b, kb) == 0);
    CHECK(memcmp(ka, kb, 16) == 0);

    /* One source: an IPv4 address in either spelling, an IPv6 /64. */
    struct sockaddr_storage c, d;
    CHECK(netaddr_same_source((struct sockaddr *)&a, (struct sockaddr *)&b));
    CHECK(netaddr_ip_sockaddr("192.0.2.8", 1, &c, &len) == 0);
    CHECK(!netaddr_same_source((struct sockaddr *)&a, (struct sockaddr *)&c));
    CHECK(netaddr_ip_sockaddr("2001:db8:1:2::1", 1, &c, &len) == 0);
    CHECK(netaddr_ip_sockaddr("2001:db8:1:2:ffff:ffff:ffff:ffff", 9, &d, &len) == 0);
    CHECK(netaddr_same_source((struct sockaddr *)&c, (struct sockaddr *)&d));
    CHECK(netaddr_ip_sockaddr("2001:db8:1:3::1", 1, &d, &len) == 0);
    CHECK(!netaddr_same_source((struct sockaddr *)&c, (struct sockaddr *)&d));
    CHECK(netaddr_source_share(128) == 16 && netaddr_source_share(256) == 32);
    CHECK(netaddr_source_share(8) == 1 && netaddr_source_share(1) == 1 &&
          netaddr_source_share(0) == 1);
    /* ::c000:207 is not ::ffff:192.0.2.7, and its /64 is not an IPv4 address's. */
    CHECK(netaddr_ip_sockaddr("::c000:207", 1, &d, &len) == 0);
    CHECK(!netaddr_same_source((struct sockaddr *)&a, (struct sockaddr *)&d));
}

int main(void)
{
    test_self_addresses();
    test_ip_sockaddr();
    test_cidr_parse();
    test_cidr_match();
    test_literals();
    test_split();
    test_format();
    return check_summary();
}

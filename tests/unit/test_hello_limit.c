/* Unit tests for the Hello path's per-source limits: the failure block, the log rate
 * limit with its suppressed count, and the bounded table. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "check.h"
#include "hello_limit.h"

static struct sockaddr_storage v4(const char *ip, int port)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, ip, &sin->sin_addr);
    return ss;
}

static struct sockaddr_storage v6(const char *ip)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
    sin6->sin6_family = AF_INET6;
    inet_pton(AF_INET6, ip, &sin6->sin6_addr);
    return ss;
}

#define SA(x) ((const struct sockaddr *)&(x))

static void test_block(void)
{
    struct hello_limit *hl = hello_limit_new(16);
    struct sockaddr_storage a = v4("10.0.0.1", 1000), a2 = v4("10.0.0.1", 2000),
                            b = v4("10.0.0.2", 1000);
    int64_t t = 1000000;
    /* Nine failures: not blocked; the tenth within 60 s blocks, whatever the port. */
    for (int i = 0; i < HELLO_LIMIT_FAILURES - 1; i++) {
        CHECK(!hello_limit_failure(hl, SA(*(i % 2 ? &a : &a2)), t + i * 1000));
        CHECK(!hello_limit_blocked(hl, SA(a), t + i * 1000));
    }
    CHECK(hello_limit_failure(hl, SA(a), t + 9000));
    CHECK(hello_limit_blocked(hl, SA(a), t + 9000));
    CHECK(hello_limit_blocked(hl, SA(a2), t + 9000 + HELLO_LIMIT_BLOCK_MS - 1));
    /* Another address is not affected. */
    CHECK(!hello_limit_blocked(hl, SA(b), t + 9000));
    /* The block ends after 60 s. */
    CHECK(!hello_limit_blocked(hl, SA(a), t + 9000 + HELLO_LIMIT_BLOCK_MS));

    /* Ten failures spread over more than 60 s never block. */
    int64_t u = t + 200000;
    bool blocked = false;
    for (int i = 0; i < 30; i++)
        blocked |= hello_limit_failure(hl, SA(b), u + (int64_t)i * 7000);
    CHECK(!blocked && !hello_limit_blocked(hl, SA(b), u + 30 * 7000));
    hello_limit_free(hl);
}

static void test_v4_mapped(void)
{
    struct hello_limit *hl = hello_limit_new(16);
    struct sockaddr_storage a = v4("192.0.2.7", 1), m = v6("::ffff:192.0.2.7"),
                            other = v6("2001:db8::7");
    for (int i = 0; i < HELLO_LIMIT_FAILURES; i++)
        hello_limit_failure(hl, SA(m), 5000 + i);
    CHECK(hello_limit_blocked(hl, SA(a), 6000));
    CHECK(!hello_limit_blocked(hl, SA(other), 6000));
    CHECK(hello_limit_sources(hl) == 1);
    hello_limit_free(hl);
}

static void test_log(void)
{
    struct hello_limit *hl = hello_limit_new(16);
    struct sockaddr_storage a = v4("10.0.0.1", 1), b = v4("10.0.0.2", 1);
    uint64_t sup = 99;
    int64_t t = 50000;
    CHECK(hello_limit_log(hl, SA(a), HELLO_LOG_AUTH_FAILED, t, &sup) && sup == 0);
    /* 100 more within 10 s: none logged. */
    int logged = 0;
    for (int i = 1; i <= 100; i++)
        logged += hello_limit_log(hl, SA(a), HELLO_LOG_AUTH_FAILED, t + i * 10, &sup);
    CHECK(logged == 0);
    /* Other kinds and other sources have their own budget. */
    CHECK(hello_limit_log(hl, SA(a), HELLO_LOG_BAD_HELLO, t + 5, &sup) && sup == 0);
    CHECK(hello_limit_log(hl, SA(b), HELLO_LOG_AUTH_FAILED, t + 5, &sup) && sup == 0);
    /* After 10 s: logged again, with the count of those held back. */
    CHECK(hello_limit_log(hl, SA(a), HELLO_LOG_AUTH_FAILED, t + HELLO_LIMIT_LOG_MS, &sup));
    CHECK(sup == 100);
    CHECK(!hello_limit_log(hl, SA(a), HELLO_LOG_KINDS, t, &sup));
    hello_limit_free(hl);
}

static void test_global_log_cap(void)
{
    struct hello_limit *hl = hello_limit_new(1024);
    uint64_t sup;
    int logged = 0;
    char ip[32];
    for (int i = 0; i < 500; i++) {
        snprintf(ip, sizeof(ip), "10.0.%d.%d", i / 250, i % 250);
        struct sockaddr_storage s = v4(ip, 1);
        logged += hello_limit_log(hl, SA(s), HELLO_LOG_TIMEOUT, 1000 + i, &sup);
    }
    CHECK(logged == HELLO_LIMIT_LOG_GLOBAL);
    hello_limit_free(hl);
}

static void test_bounded(void)
{
    struct hello_limit *hl = hello_limit_new(64);
    char ip[32];
    struct sockaddr_storage first = v4("10.9.0.0", 1);
    for (int i = 0; i < HELLO_LIMIT_FAILURES; i++)
        hello_limit_failure(hl, SA(first), 1000);
    CHECK(hello_limit_blocked(hl, SA(first), 1001));
    for (int i = 0; i < 10000; i++) {
        snprintf(ip, sizeof(ip), "10.%d.%d.%d", 1 + i / 65536, (i / 256) % 256, i % 256);
        struct sockaddr_storage s = v4(ip, 1);
        hello_limit_failure(hl, SA(s), 2000 + i);
        CHECK(hello_limit_sources(hl) <= 64);
    }
    CHECK(hello_limit_sources(hl) == 64);
    /* 10,000 new addresses did not wash the block out: only sources that are not
     * blocked were evicted, the least recently active first. */
    CHECK(hello_limit_blocked(hl, SA(first), 13000));
    /* The newest 63 are all still findable after many evictions (the hash chains hold). */
    int found = 0;
    for (int i = 10000 - 63; i < 10000; i++) {
        snprintf(ip, sizeof(ip), "10.%d.%d.%d", 1 + i / 65536, (i / 256) % 256, i % 256);
        struct sockaddr_storage s = v4(ip, 1);
        for (int k = 0; k < HELLO_LIMIT_FAILURES - 1; k++)
            hello_limit_failure(hl, SA(s), 20000);
        found += hello_limit_blocked(hl, SA(s), 20001);
    }
    CHECK(found == 63);
    CHECK(hello_limit_sources(hl) == 64);
    /* Every entry blocked now: a new source takes the place of the block that ends
     * first (first's, at 61000). */
    struct sockaddr_storage fresh = v4("10.200.0.1", 1);
    CHECK(!hello_limit_failure(hl, SA(fresh), 30000));
    CHECK(hello_limit_sources(hl) == 64);
    CHECK(!hello_limit_blocked(hl, SA(first), 30001));
    CHECK(hello_limit_blocked(hl, SA(fresh), 30001) == false);
    snprintf(ip, sizeof(ip), "10.%d.%d.%d", 1 + 9999 / 65536, (9999 / 256) % 256, 9999 % 256);
    struct sockaddr_storage newest = v4(ip, 1);
    CHECK(hello_limit_blocked(hl, SA(newest), 30001));
    hello_limit_free(hl);
}

/* An IPv6 source is its /64: the other addresses of one prefix share its failures. */
static void test_v6_prefix(void)
{
    struct hello_limit *hl = hello_limit_new(0);
    char ip[64];
    for (int i = 0; i < HELLO_LIMIT_FAILURES; i++) {
        snprintf(ip, sizeof(ip), "2001:db8:1:2::%x", i + 1);
        struct sockaddr_storage s = v6(ip);
        hello_limit_failure(hl, SA(s), 1000 + i);
    }
    struct sockaddr_storage same = v6("2001:db8:1:2:ffff:ffff:ffff:ffff");
    struct sockaddr_storage other = v6("2001:db8:1:3::1");
    CHECK(hello_limit_blocked(hl, SA(same), 2000));
    CHECK(!hello_limit_blocked(hl, SA(other), 2000));
    CHECK(hello_limit_sources(hl) == 1);
    hello_limit_free(hl);
}

int main(void)
{
    test_block();
    test_v4_mapped();
    test_v6_prefix();
    test_log();
    test_global_log_cap();
    test_bounded();
    return check_summary();
}

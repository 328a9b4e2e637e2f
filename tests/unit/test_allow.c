/* Unit tests for the client's --allow list (src/client/allow.c, in portmux_client_core). */
#include "allow.h"
#include "check.h"

#include <stdio.h>
#include <string.h>

static bool parses(const char *text)
{
    struct allow_rule r;
    char err[128];
    return allow_rule_parse(text, &r, err, sizeof(err)) == 0;
}

static void test_parse_good(void)
{
    struct allow_rule r;
    char err[128];
    CHECK(allow_rule_parse("127.0.0.1:22", &r, err, sizeof(err)) == 0);
    CHECK(!r.is_host && r.cidr.family == AF_INET && r.cidr.prefix == 32);
    CHECK(r.port_lo == 22 && r.port_hi == 22);
    CHECK(allow_rule_parse("10.0.0.0/8:5432-5439", &r, err, sizeof(err)) == 0);
    CHECK(r.cidr.prefix == 8 && r.port_lo == 5432 && r.port_hi == 5439);
    CHECK(allow_rule_parse("[::1]:22", &r, err, sizeof(err)) == 0);
    CHECK(r.cidr.family == AF_INET6 && r.cidr.prefix == 128);
    CHECK(allow_rule_parse("[fd00::/8]:5432-5439", &r, err, sizeof(err)) == 0);
    CHECK(r.cidr.family == AF_INET6 && r.cidr.prefix == 8 && r.port_hi == 5439);
    CHECK(allow_rule_parse("db.internal:5432", &r, err, sizeof(err)) == 0);
    CHECK(r.is_host && strcmp(r.host, "db.internal") == 0);
    CHECK(parses("0.0.0.0/0:1-65535"));
    CHECK(parses("localhost:65535"));
}

static void test_parse_bad(void)
{
    const char *bad[] = {
        "", ":22", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
        "127.0.0.1:22-21", "127.0.0.1:22-", "127.0.0.1:-22", "127.0.0.1:2a",
        "127.0.0.1:123456", "10.0.0.0/33:22", "10.0.0.0/:22", "::1:22", "[::1]22",
        "[::1:22", "[10.0.0.1]:22", "[db]:22", "bad_host!:22", "host/8:22",
        "[fd00::/129]:22", "-a.b:22", "10.0.0.1:22:23",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        bool ok = !parses(bad[i]);
        if (!ok)
            fprintf(stderr, "accepted bad rule '%s'\n", bad[i]);
        CHECK(ok);
    }
    char longname[400];
    memset(longname, 'a', sizeof(longname));
    strcpy(longname + 300, ":22");
    CHECK(!parses(longname));
}

static void test_list(void)
{
    struct allow_list l = {0};
    char err[160];
    CHECK(allow_list_match(&l, "anything", 1)); /* empty = allow all */
    CHECK(allow_list_add(&l, "127.0.0.1:22,10.0.0.0/8:5432-5439", err, sizeof(err)) == 0);
    CHECK(allow_list_add(&l, "[fd00::/8]:6379,db.internal:5432,[::1]:80", err, sizeof(err)) == 0);
    CHECK(l.len == 5);
    CHECK(allow_list_match(&l, "127.0.0.1", 22));
    CHECK(!allow_list_match(&l, "127.0.0.1", 23));
    CHECK(!allow_list_match(&l, "127.0.0.2", 22));
    CHECK(allow_list_match(&l, "10.1.2.3", 5432));
    CHECK(allow_list_match(&l, "10.255.255.255", 5439));
    CHECK(!allow_list_match(&l, "10.1.2.3", 5440));
    CHECK(!allow_list_match(&l, "11.0.0.1", 5432));
    CHECK(allow_list_match(&l, "fd12:3456::1", 6379));
    CHECK(!allow_list_match(&l, "fe80::1", 6379));
    CHECK(allow_list_match(&l, "::1", 80));
    CHECK(allow_list_match(&l, "[::1]", 80));
    CHECK(allow_list_match(&l, "::ffff:127.0.0.1", 22)); /* v4-mapped obeys v4 rules */
    CHECK(allow_list_match(&l, "db.internal", 5432));
    CHECK(allow_list_match(&l, "DB.Internal", 5432));
    CHECK(!allow_list_match(&l, "db.internal", 5433));
    CHECK(!allow_list_match(&l, "db.internal.evil.com", 5432));
    CHECK(!allow_list_match(&l, "localhost", 22)); /* names are not resolved */
    /* A bad rule adds nothing and names itself. */
    CHECK(allow_list_add(&l, "127.0.0.1:22,nope", err, sizeof(err)) == -1);
    CHECK(strstr(err, "nope") != NULL);
    CHECK(l.len == 5);
    CHECK(allow_list_add(&l, "127.0.0.1:22,", err, sizeof(err)) == -1);
    CHECK(allow_list_add(&l, "", err, sizeof(err)) == -1);
    CHECK(l.len == 5);
    allow_list_free(&l);
    CHECK(l.len == 0 && l.rules == NULL);
    allow_list_free(NULL);
}

/* An IPv6 rule never admits an IPv4 target, not even ::/0 or ::ffff:0:0/96. */
static void test_v6_rule_never_matches_v4(void)
{
    struct allow_list l = {0};
    char err[256];
    CHECK(allow_list_add(&l, "[::/0]:1-65535,[::ffff:0:0/96]:22", err, sizeof(err)) == 0);
    CHECK(!allow_list_match(&l, "127.0.0.1", 22));
    CHECK(!allow_list_match(&l, "10.0.0.1", 80));
    CHECK(!allow_list_match(&l, "::ffff:127.0.0.1", 22)); /* v4-mapped is an IPv4 target */
    CHECK(allow_list_match(&l, "::1", 22));
    CHECK(allow_list_match(&l, "2001:db8::1", 443));
    allow_list_free(&l);
    /* And an IPv4 rule still covers the v4-mapped spelling of its addresses. */
    CHECK(allow_list_add(&l, "0.0.0.0/0:22", err, sizeof(err)) == 0);
    CHECK(allow_list_match(&l, "::ffff:10.1.2.3", 22));
    CHECK(!allow_list_match(&l, "::1", 22));
    allow_list_free(&l);
}

int main(void)
{
    test_v6_rule_never_matches_v4();
    test_parse_good();
    test_parse_bad();
    test_list();
    return check_summary();
}

/* Unit tests for api_guard: loopback literals, Host (DNS rebinding) and Origin checks, and
 * api_dispatch's order of refusals without any socket. */
#include <string.h>
#include <strings.h>

#include "api.h"
#include "api_guard.h"
#include "check.h"
#include "config.h"
#include "server.h"

static void test_loopback(void)
{
    const char *yes[] = {"127.0.0.1", "127.255.0.9", "::1", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1"};
    const char *no[] = {"0.0.0.0", "::", "10.0.0.1", "128.0.0.1", "::2", "::ffff:10.0.0.1",
                        "localhost", "127.1", "127.0.0.1.example", "", "[::1]"};
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++)
        check_at(api_guard_is_loopback(yes[i]), __FILE__, __LINE__, yes[i]);
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++)
        check_at(!api_guard_is_loopback(no[i]), __FILE__, __LINE__, no[i]);
    CHECK(!api_guard_is_loopback(NULL));
}

static int load(struct config *c, const char *yaml)
{
    char err[256];
    if (config_init_defaults(c) != 0)
        return -1;
    return config_load_string(c, yaml, strlen(yaml), "t", err, sizeof(err));
}

static void test_host(void)
{
    struct config c;
    CHECK(load(&c, "api: {listen_addr: 10.1.1.1, allowed_hosts: [pm.example.com, 'fd00::5']}") == 0);
    const char *yes[] = {"127.0.0.1", "127.0.0.1:8080", "127.9.9.9:1", "[::1]", "[::1]:8080",
                         "[0::1]:1", "localhost", "LOCALHOST:99999", "10.1.1.1", "10.1.1.1:8080",
                         "pm.example.com", "PM.Example.Com:443", "[fd00::5]:80", NULL};
    const char *no[] = {"attacker.example", "attacker.example:8080", "", ":8080", "::1",
                        "[::1", "[::1]x", "[::1]:", "[pm.example.com]", "127.0.0.1:",
                        "127.0.0.1:123456", "127.0.0.1:80:80", "127.0.0.1:http",
                        "localhost.example", "pm.example.com.evil", "10.1.1.2",
                        "fd00::5", "127.0.0.1 ", " 127.0.0.1", "127.0.0.1/x"};
    CHECK(api_guard_host_ok(&c, NULL)); /* HTTP/1.0 without Host */
    for (size_t i = 0; yes[i]; i++)
        check_at(api_guard_host_ok(&c, yes[i]), __FILE__, __LINE__, yes[i]);
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++)
        check_at(!api_guard_host_ok(&c, no[i]), __FILE__, __LINE__, no[i]);
    char big[400];
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    CHECK(!api_guard_host_ok(&c, big));
    config_free(&c);
}

static void test_origin(void)
{
    struct config c;
    CHECK(load(&c, "api: {allowed_hosts: [pm.example.com]}") == 0);
    const char *host = "127.0.0.1:8080";
    /* No Origin and no Sec-Fetch-Site: curl, scripts. */
    CHECK(api_guard_origin_ok(&c, NULL, host, NULL));
    CHECK(api_guard_origin_ok(&c, NULL, NULL, NULL));
    CHECK(api_guard_origin_ok(&c, NULL, host, "none"));
    CHECK(api_guard_origin_ok(&c, NULL, host, "same-site"));
    CHECK(!api_guard_origin_ok(&c, NULL, host, "cross-site"));
    CHECK(!api_guard_origin_ok(&c, NULL, host, "CROSS-SITE"));
    /* The console's own requests. */
    CHECK(api_guard_origin_ok(&c, "http://127.0.0.1:8080", host, "same-origin"));
    CHECK(api_guard_origin_ok(&c, "https://127.0.0.1:8080", host, NULL));
    CHECK(api_guard_origin_ok(&c, "HTTP://127.0.0.1:8080", host, NULL));
    CHECK(api_guard_origin_ok(&c, "http://LOCALHOST:8080", "localhost:8080", NULL));
    /* A proxy that rewrites Host keeps the browser's Origin: allowed by name, on the
     * scheme's default port (written or not). */
    CHECK(api_guard_origin_ok(&c, "https://pm.example.com", host, NULL));
    CHECK(api_guard_origin_ok(&c, "https://PM.example.com:443", host, NULL));
    CHECK(api_guard_origin_ok(&c, "http://pm.example.com", host, NULL));
    CHECK(api_guard_origin_ok(&c, "http://pm.example.com:80", host, NULL));
    /* Any other port of that name is another origin (it may be a mapped port serving
     * any page), unless Host itself says the request went there. */
    CHECK(!api_guard_origin_ok(&c, "https://pm.example.com:8443", host, NULL));
    CHECK(!api_guard_origin_ok(&c, "http://pm.example.com:10080", host, NULL));
    CHECK(!api_guard_origin_ok(&c, "http://pm.example.com:443", host, NULL));
    CHECK(!api_guard_origin_ok(&c, "https://pm.example.com:80", host, NULL));
    CHECK(!api_guard_origin_ok(&c, "https://pm.example.com:0443x", host, NULL));
    CHECK(api_guard_origin_ok(&c, "https://pm.example.com:8443", "pm.example.com:8443", NULL));
    const char *foreign[] = {"http://127.0.0.1:8081", "http://127.0.0.1", "http://127.0.0.2:8080",
                             "http://localhost:8080", "null", "", "127.0.0.1:8080",
                             "http://127.0.0.1:8080/", "http://127.0.0.1:8080?x",
                             "http://x@127.0.0.1:8080", "ftp://127.0.0.1:8080", "http://",
                             "https://pm.example.com.evil", "https://evil.example",
                             "http://127.0.0.1:8080#"};
    for (size_t i = 0; i < sizeof(foreign) / sizeof(foreign[0]); i++)
        check_at(!api_guard_origin_ok(&c, foreign[i], host, NULL), __FILE__, __LINE__,
                 foreign[i]);
    CHECK(!api_guard_origin_ok(&c, "http://127.0.0.1:8080", NULL, NULL));
    CHECK(!api_guard_origin_ok(&c, "http://127.0.0.1:8080", host, "cross-site"));
    config_free(&c);
}

struct hdrs {
    const char *const *kv; /* name, value, ..., NULL */
};

static const char *hdr(void *ctx, const char *name)
{
    const struct hdrs *h = ctx;
    for (size_t i = 0; h->kv[i]; i += 2)
        if (strcasecmp(h->kv[i], name) == 0)
            return h->kv[i + 1];
    return NULL;
}

/* Runs api_admit on a request with these headers; returns the status of the refusal, or
 * 0 when admitted. */
static unsigned admit(struct server *srv, const char *method, const char *url,
                      const char *const *kv)
{
    struct hdrs h = {kv};
    struct api_req rq = {.method = method, .url = url, .header = hdr, .header_ctx = &h};
    struct api_reply out = {0};
    unsigned status = api_admit(srv, &rq, &out) ? 0 : out.status;
    if (status)
        CHECK(out.body && strstr(out.body, "\"success\":false"));
    api_reply_clear(&out);
    return status;
}

static void test_admit_order(void)
{
    struct config c;
    CHECK(load(&c, "api: {token: s3cret-token}") == 0);
    struct server srv = {.cfg = &c};
    const char *bad_host[] = {"Host", "evil.example", "Origin", "null", NULL};
    const char *bad_origin[] = {"Host", "127.0.0.1:1", "Origin", "null", NULL};
    const char *cross[] = {"Host", "127.0.0.1:1", "Sec-Fetch-Site", "cross-site", NULL};
    const char *plain[] = {"Host", "127.0.0.1:1", NULL};
    const char *token[] = {"Host", "127.0.0.1:1", "Authorization", "Bearer s3cret-token",
                           "Origin", "http://127.0.0.1:1", NULL};
    const char *big[] = {"Host", "localhost", "Authorization", "Bearer s3cret-token",
                         "Content-Length", "65537", NULL};
    CHECK(admit(&srv, "GET", "/nope", bad_host) == 421);
    CHECK(admit(&srv, "GET", "/health", bad_host) == 421);
    CHECK(admit(&srv, "GET", "/nope", bad_origin) == 403);
    CHECK(admit(&srv, "POST", "/api/mapping/create", cross) == 403);
    CHECK(admit(&srv, "GET", "/nope", plain) == 404);
    CHECK(admit(&srv, "PUT", "/api/mapping/list", plain) == 405);
    CHECK(admit(&srv, "GET", "/api/mapping/list", plain) == 401);
    CHECK(admit(&srv, "GET", "/api/mapping/list", token) == 0);
    CHECK(admit(&srv, "POST", "/api/mapping/create", big) == 413);
    CHECK(admit(&srv, "GET", "/health", plain) == 0);
    /* api.allowed_ips comes first: an unknown peer is 403 forbidden whatever the Host. */
    config_free(&c);
    CHECK(load(&c, "api: {allowed_ips: [10.0.0.0/8]}") == 0);
    unsigned st = admit(&srv, "GET", "/health", bad_host);
    CHECK(st == 403);
    config_free(&c);
}

int main(void)
{
    test_loopback();
    test_host();
    test_origin();
    test_admit_order();
    return check_summary();
}

/* Unit tests for pg_dial: which hosts of a conninfo need a lookup, the host/hostaddr/port
 * lists rebuilt with one entry per address, and the dial on a loop (an /etc/hosts-style
 * file, a name nothing answers, a cancel while a query is in flight). */
#include <arpa/inet.h>
#include <event2/dns.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "pg_dial.h"

/* The value params give keyword, or NULL. */
static const char *param(char **keys, char **vals, const char *keyword)
{
    for (size_t i = 0; keys[i]; i++)
        if (strcmp(keys[i], keyword) == 0)
            return vals[i];
    return NULL;
}

static int streq(const char *a, const char *b)
{
    return a && b && strcmp(a, b) == 0;
}

static void test_one_name_two_addresses(void)
{
    struct pg_dial_plan p;
    char err[128] = "";
    CHECK(pg_dial_plan_init(&p, "postgresql://app:secret@pg.example:5433/maps", err,
                            sizeof(err)) == 1);
    CHECK(p.nhosts == 1 && streq(p.hosts[0], "pg.example") && p.resolve[0]);
    pg_dial_plan_add_addr(&p, 0, "10.0.0.1");
    pg_dial_plan_add_addr(&p, 0, "fd00::1");
    char **k, **v;
    CHECK(pg_dial_plan_params(&p, "portmux-store", &k, &v, err, sizeof(err)) == 0);
    CHECK(streq(param(k, v, "host"), "pg.example,pg.example"));
    CHECK(streq(param(k, v, "hostaddr"), "10.0.0.1,fd00::1"));
    CHECK(streq(param(k, v, "port"), "5433,5433"));
    CHECK(streq(param(k, v, "dbname"), "maps"));
    CHECK(streq(param(k, v, "user"), "app"));
    CHECK(streq(param(k, v, "password"), "secret"));
    CHECK(streq(param(k, v, "fallback_application_name"), "portmux-store"));
    pg_dial_params_free(k, v);
    pg_dial_plan_free(&p);
}

static void test_nothing_to_resolve(void)
{
    const char *cases[] = {
        "postgresql://127.0.0.1:5432/db",
        "host=::1 port=5432",
        "postgresql://[fe80::1%25eth0]/db",
        "host=/var/run/postgresql dbname=x",
        "host=pg.example hostaddr=10.0.0.9", /* hostaddr given: libpq looks nothing up */
        "dbname=x",                          /* no host: the default socket */
        "host=a.test,b.test port=1,2,3",     /* a mismatch libpq reports itself */
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        struct pg_dial_plan p;
        char err[128] = "";
        int n = pg_dial_plan_init(&p, cases[c], err, sizeof(err));
        CHECK(n == 0);
        if (n != 0) {
            fprintf(stderr, "  case %s: %d (%s)\n", cases[c], n, err);
            if (n > 0)
                pg_dial_plan_free(&p);
            continue;
        }
        char **k, **v;
        CHECK(pg_dial_plan_params(&p, "portmux-sync", &k, &v, err, sizeof(err)) == 0);
        /* Passed as written: no hostaddr list made up. */
        if (c != 4)
            CHECK(param(k, v, "hostaddr") == NULL);
        CHECK(streq(param(k, v, "fallback_application_name"), "portmux-sync"));
        pg_dial_params_free(k, v);
        pg_dial_plan_free(&p);
    }
}

static void test_mixed_hosts_and_port_lists(void)
{
    struct pg_dial_plan p;
    char err[128] = "";
    CHECK(pg_dial_plan_init(&p, "host=a.test,/run/pg,10.1.1.1,b.test port=1,2,3,4 dbname=d",
                            err, sizeof(err)) == 2);
    CHECK(p.nhosts == 4 && p.nports == 4);
    CHECK(p.resolve[0] && !p.resolve[1] && !p.resolve[2] && p.resolve[3]);
    pg_dial_plan_add_addr(&p, 0, "192.0.2.1");
    pg_dial_plan_add_addr(&p, 0, "192.0.2.2");
    /* b.test did not resolve: it is left out, the others keep their order and ports. */
    char **k, **v;
    CHECK(pg_dial_plan_params(&p, "x", &k, &v, err, sizeof(err)) == 0);
    CHECK(streq(param(k, v, "host"), "a.test,a.test,/run/pg,10.1.1.1"));
    CHECK(streq(param(k, v, "hostaddr"), "192.0.2.1,192.0.2.2,,"));
    CHECK(streq(param(k, v, "port"), "1,1,2,3"));
    pg_dial_params_free(k, v);
    pg_dial_plan_free(&p);

    /* One port for every host stays one port. */
    CHECK(pg_dial_plan_init(&p, "host=a.test,b.test port=6000", err, sizeof(err)) == 2);
    pg_dial_plan_add_addr(&p, 0, "192.0.2.1");
    pg_dial_plan_add_addr(&p, 1, "192.0.2.7");
    CHECK(pg_dial_plan_params(&p, "x", &k, &v, err, sizeof(err)) == 0);
    CHECK(streq(param(k, v, "host"), "a.test,b.test"));
    CHECK(streq(param(k, v, "hostaddr"), "192.0.2.1,192.0.2.7"));
    CHECK(streq(param(k, v, "port"), "6000"));
    pg_dial_params_free(k, v);
    pg_dial_plan_free(&p);
}

/* Hosts the conninfo does not name come from the environment, as libpq takes them. */
static void test_environment(void)
{
    struct pg_dial_plan p;
    char err[128] = "";
    char **k, **v;
    setenv("PGHOST", "env-a.test,env-b.test", 1);
    setenv("PGPORT", "7001,7002", 1);
    CHECK(pg_dial_plan_init(&p, "dbname=x", err, sizeof(err)) == 2);
    pg_dial_plan_add_addr(&p, 1, "192.0.2.9");
    CHECK(pg_dial_plan_params(&p, "x", &k, &v, err, sizeof(err)) == 0);
    CHECK(streq(param(k, v, "host"), "env-b.test"));
    CHECK(streq(param(k, v, "hostaddr"), "192.0.2.9"));
    CHECK(streq(param(k, v, "port"), "7002"));
    pg_dial_params_free(k, v);
    pg_dial_plan_free(&p);
    /* The conninfo's own host wins; an empty one is given (the default socket). */
    CHECK(pg_dial_plan_init(&p, "host=10.0.0.1", err, sizeof(err)) == 0);
    pg_dial_plan_free(&p);
    CHECK(pg_dial_plan_init(&p, "host=''", err, sizeof(err)) == 0);
    pg_dial_plan_free(&p);
    setenv("PGHOSTADDR", "10.0.0.5", 1);
    CHECK(pg_dial_plan_init(&p, "dbname=x", err, sizeof(err)) == 0);
    pg_dial_plan_free(&p);
    unsetenv("PGHOST");
    unsetenv("PGPORT");
    unsetenv("PGHOSTADDR");
}

static void test_limits_and_errors(void)
{
    struct pg_dial_plan p;
    char err[128] = "";
    CHECK(pg_dial_plan_init(&p, "postgresql://[oops", err, sizeof(err)) == -1);
    CHECK(err[0] != '\0' && !strchr(err, '\n'));

    char many[512] = "host=";
    for (int i = 0; i <= PG_DIAL_MAX_HOSTS; i++)
        snprintf(many + strlen(many), sizeof(many) - strlen(many), "%sh%d.test",
                 i ? "," : "", i);
    err[0] = '\0';
    CHECK(pg_dial_plan_init(&p, many, err, sizeof(err)) == -1);
    CHECK(strstr(err, "hosts") != NULL);

    /* Addresses beyond the cap are dropped, not stored. */
    CHECK(pg_dial_plan_init(&p, "host=a.test", err, sizeof(err)) == 1);
    for (int i = 0; i < PG_DIAL_MAX_ADDRS + 5; i++) {
        char a[32];
        snprintf(a, sizeof(a), "192.0.2.%d", i + 1);
        pg_dial_plan_add_addr(&p, 0, a);
    }
    CHECK(p.naddrs[0] == PG_DIAL_MAX_ADDRS);
    pg_dial_plan_add_addr(&p, 5, "192.0.2.200"); /* no such host: ignored */
    pg_dial_plan_free(&p);

    /* No name resolved: no host left to try. */
    CHECK(pg_dial_plan_init(&p, "host=a.test,b.test", err, sizeof(err)) == 2);
    char **k = NULL, **v = NULL;
    err[0] = '\0';
    CHECK(pg_dial_plan_params(&p, "x", &k, &v, err, sizeof(err)) == -1);
    CHECK(strstr(err, "no address") != NULL);
    pg_dial_plan_free(&p);

    /* The conninfo's own fallback name wins over ours. */
    CHECK(pg_dial_plan_init(&p, "host=10.0.0.1 fallback_application_name=mine", err,
                            sizeof(err)) == 0);
    CHECK(pg_dial_plan_params(&p, "portmux-store", &k, &v, err, sizeof(err)) == 0);
    CHECK(streq(param(k, v, "fallback_application_name"), "mine"));
    pg_dial_params_free(k, v);
    pg_dial_plan_free(&p);
}

/* ---- on a loop ---- */

struct dial_result {
    int calls;
    PGconn *conn;
    char err[256];
};

static void on_dialled(PGconn *conn, const char *err, void *arg)
{
    struct dial_result *r = arg;
    r->calls++;
    r->conn = conn;
    snprintf(r->err, sizeof(r->err), "%s", err ? err : "");
}

/* The connection's option keyword, as libpq holds it (PQconninfo). */
static char *conn_option(PGconn *c, const char *keyword)
{
    PQconninfoOption *opts = PQconninfo(c);
    char *out = NULL;
    for (PQconninfoOption *o = opts; o && o->keyword; o++)
        if (strcmp(o->keyword, keyword) == 0 && o->val)
            out = strdup(o->val);
    PQconninfoFree(opts);
    return out;
}

static void run_loop_ms(struct event_base *base, int ms)
{
    struct timeval tv = {0, ms * 1000};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
}

static void test_dial_on_loop(void)
{
    struct event_base *base = event_base_new();
    struct evdns_base *dns = evdns_base_new(base, 0);
    char hosts[] = "/tmp/portmux-test-pg-dial-XXXXXX";
    int fd = mkstemp(hosts);
    CHECK(fd >= 0);
    const char text[] = "127.0.0.1 pg-a.test\n127.0.0.2 pg-a.test\n";
    CHECK(write(fd, text, sizeof(text) - 1) == (ssize_t)(sizeof(text) - 1));
    close(fd);
    CHECK(evdns_base_load_hosts(dns, hosts) == 0);
    unlink(hosts);

    /* A name from the hosts file: answered at once, yet the callback waits for the loop. */
    struct dial_result r = {0};
    struct pg_dial *d = pg_dial_start(base, dns, "postgresql://u@pg-a.test:1/db",
                                      "portmux-test", on_dialled, &r);
    CHECK(d != NULL);
    CHECK(r.calls == 0);
    run_loop_ms(base, 50);
    CHECK(r.calls == 1 && r.conn != NULL);
    if (r.conn) {
        char *ha = conn_option(r.conn, "hostaddr");
        char *h = conn_option(r.conn, "host");
        CHECK(streq(ha, "127.0.0.1,127.0.0.2"));
        CHECK(streq(h, "pg-a.test,pg-a.test"));
        free(ha);
        free(h);
        PQfinish(r.conn);
    }

    /* A name nothing knows (no nameserver at all): the callback says which. */
    memset(&r, 0, sizeof(r));
    d = pg_dial_start(base, dns, "host=nope.invalid port=1", "portmux-test", on_dialled, &r);
    CHECK(d != NULL);
    for (int i = 0; i < 100 && r.calls == 0; i++)
        run_loop_ms(base, 20);
    CHECK(r.calls == 1 && r.conn == NULL);
    CHECK(strstr(r.err, "nope.invalid") != NULL);

    /* An unparsable conninfo fails through the callback too. */
    memset(&r, 0, sizeof(r));
    d = pg_dial_start(base, dns, "postgresql://[oops", "portmux-test", on_dialled, &r);
    CHECK(d != NULL && r.calls == 0);
    run_loop_ms(base, 20);
    CHECK(r.calls == 1 && r.conn == NULL && r.err[0] != '\0');

    /* A nameserver that never answers: cancelled in flight, the callback never runs. */
    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sin);
    CHECK(bind(udp, (struct sockaddr *)&sin, sizeof(sin)) == 0);
    CHECK(getsockname(udp, (struct sockaddr *)&sin, &len) == 0);
    char ns[64];
    snprintf(ns, sizeof(ns), "127.0.0.1:%d", ntohs(sin.sin_port));
    CHECK(evdns_base_nameserver_ip_add(dns, ns) == 0);
    memset(&r, 0, sizeof(r));
    d = pg_dial_start(base, dns, "host=silent.test,pg-a.test port=1", "portmux-test",
                      on_dialled, &r);
    CHECK(d != NULL);
    run_loop_ms(base, 100);
    CHECK(r.calls == 0);
    char q[512];
    CHECK(recv(udp, q, sizeof(q), MSG_DONTWAIT) > 0); /* the query did go out */
    pg_dial_cancel(d);
    run_loop_ms(base, 100);
    CHECK(r.calls == 0);
    close(udp);

    evdns_base_free(dns, 0);
    event_base_free(base);
}

int main(void)
{
    /* The cases below say which hosts they name; none may come from the caller's shell. */
    unsetenv("PGHOST");
    unsetenv("PGPORT");
    unsetenv("PGHOSTADDR");
    test_one_name_two_addresses();
    test_nothing_to_resolve();
    test_mixed_hosts_and_port_lists();
    test_environment();
    test_limits_and_errors();
    test_dial_on_loop();
    return check_summary();
}

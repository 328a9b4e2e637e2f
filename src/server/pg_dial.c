/* Host names of a libpq conninfo resolved with evdns before PQconnectStartParams (see
 * pg_dial.h for why). The plan is pure: parse, split the host and port lists, and after
 * the lookups rebuild them with one entry per address. */
#include "pg_dial.h"

#include <event2/dns.h>
#include <event2/event.h>
#include <event2/util.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>

#include "log.h"
#include "netaddr.h"

/* ---- the plan ---- */

/* Splits s at commas into at most max pieces (empty ones kept). Returns the count, or -1
 * when there are more than max pieces or memory ran out (nothing left allocated). */
const char *pg_session_options(void)
{
    const char *env = getenv("PGOPTIONS");
    return env && *env ? NULL : PG_SESSION_OPTIONS;
}

static int split_list(const char *s, char **out, size_t max)
{
    size_t n = 0;
    for (;;) {
        const char *comma = strchr(s, ',');
        size_t len = comma ? (size_t)(comma - s) : strlen(s);
        if (n == max)
            goto fail;
        out[n] = strndup(s, len);
        if (!out[n])
            goto fail;
        n++;
        if (!comma)
            return (int)n;
        s = comma + 1;
    }
fail:
    while (n > 0)
        free(out[--n]);
    return -1;
}

/* Whether libpq's getaddrinfo() would ask DNS for h: not empty (the default socket), not a
 * socket directory or abstract socket, not an IP address. */
static bool needs_lookup(const char *h)
{
    if (h[0] == '\0' || h[0] == '/' || h[0] == '@')
        return false;
    if (strchr(h, ':')) /* IPv6, perhaps with a %zone that netaddr does not take */
        return false;
    return !netaddr_is_ip_literal(h);
}

static const char *plan_opt(const struct pg_dial_plan *p, const char *keyword)
{
    for (const PQconninfoOption *o = p->opts; o->keyword; o++)
        if (strcmp(o->keyword, keyword) == 0)
            return o->val;
    return NULL;
}

static const char *plan_opt_env(const struct pg_dial_plan *p, const char *keyword,
                                const char *env)
{
    const char *v = plan_opt(p, keyword);
    return v ? v : getenv(env);
}

int pg_dial_plan_init(struct pg_dial_plan *p, const char *conninfo, char *err, size_t errlen)
{
    memset(p, 0, sizeof(*p));
    char *perr = NULL;
    p->opts = PQconninfoParse(conninfo, &perr);
    if (!p->opts) {
        snprintf(err, errlen, "%s", perr ? perr : "out of memory");
        for (char *c = err; *c; c++)
            if (*c == '\n')
                *c = ' ';
        PQfreemem(perr);
        return -1;
    }
    /* What the conninfo leaves out libpq takes from the environment (an empty value
     * counts as given): the lookups must see the hosts libpq would. */
    const char *host = plan_opt_env(p, "host", "PGHOST");
    const char *hostaddr = plan_opt_env(p, "hostaddr", "PGHOSTADDR");
    const char *port = plan_opt_env(p, "port", "PGPORT");
    /* hostaddr given: libpq looks nothing up; no host: the default socket. */
    if ((hostaddr && hostaddr[0]) || !host || !host[0])
        return 0;
    int n = split_list(host, p->hosts, PG_DIAL_MAX_HOSTS);
    if (n < 0) {
        snprintf(err, errlen, "more than %d hosts in the database URL", PG_DIAL_MAX_HOSTS);
        goto fail;
    }
    p->nhosts = (size_t)n;
    if (port && port[0]) {
        n = split_list(port, p->ports, PG_DIAL_MAX_HOSTS);
        if (n < 0 || ((size_t)n != 1 && (size_t)n != p->nhosts)) {
            /* libpq reports the mismatch itself, before any lookup: pass it as written. */
            while (n > 0)
                free(p->ports[--n]);
            for (size_t i = 0; i < p->nhosts; i++)
                free(p->hosts[i]);
            p->nhosts = 0;
            return 0;
        }
        p->nports = (size_t)n;
    }
    int lookups = 0;
    for (size_t i = 0; i < p->nhosts; i++) {
        p->resolve[i] = needs_lookup(p->hosts[i]);
        lookups += p->resolve[i];
    }
    return lookups;
fail:
    pg_dial_plan_free(p);
    return -1;
}

void pg_dial_plan_add_addr(struct pg_dial_plan *p, size_t i, const char *addr)
{
    if (i >= p->nhosts || p->naddrs[i] >= PG_DIAL_MAX_ADDRS)
        return;
    char *copy = strdup(addr);
    if (copy)
        p->addrs[i][p->naddrs[i]++] = copy;
}

void pg_dial_plan_free(struct pg_dial_plan *p)
{
    for (size_t i = 0; i < p->nhosts; i++) {
        free(p->hosts[i]);
        for (size_t a = 0; a < p->naddrs[i]; a++)
            free(p->addrs[i][a]);
    }
    for (size_t i = 0; i < p->nports; i++)
        free(p->ports[i]);
    if (p->opts)
        PQconninfoFree(p->opts);
    memset(p, 0, sizeof(*p));
}

void pg_dial_params_free(char **keys, char **vals)
{
    if (keys)
        for (size_t i = 0; keys[i]; i++) {
            free(keys[i]);
            free(vals[i]);
        }
    free(keys);
    free(vals);
}

/* The host, hostaddr and port lists with one entry per address. 0; -1 when no entry is
 * left, -2 out of memory (then nothing is left allocated). */
static int plan_lists(const struct pg_dial_plan *p, char **host, char **hostaddr, char **port)
{
    size_t lens[3] = {0};
    FILE *f[3] = {open_memstream(host, &lens[0]), open_memstream(hostaddr, &lens[1]),
                  open_memstream(port, &lens[2])};
    size_t entries = 0;
    int rc = -2;
    if (!f[0] || !f[1] || !f[2])
        goto out;
    for (size_t i = 0; i < p->nhosts; i++) {
        size_t n = p->resolve[i] ? p->naddrs[i] : 1;
        for (size_t a = 0; a < n; a++, entries++) {
            const char *sep = entries ? "," : "";
            fprintf(f[0], "%s%s", sep, p->hosts[i]);
            fprintf(f[1], "%s%s", sep, p->resolve[i] ? p->addrs[i][a] : "");
            fprintf(f[2], "%s%s", sep, p->nports == p->nhosts ? p->ports[i] : "");
        }
    }
    rc = entries ? 0 : -1;
out:
    for (int k = 0; k < 3; k++)
        if (!f[k] || fclose(f[k]) != 0)
            rc = -2;
    if (rc != 0)
        for (int k = 0; k < 3; k++) {
            char **s = k == 0 ? host : k == 1 ? hostaddr : port;
            if (f[k])
                free(*s);
            *s = NULL;
        }
    return rc;
}

int pg_dial_plan_params(const struct pg_dial_plan *p, const char *app_name, char ***keys,
                        char ***vals, char *err, size_t errlen)
{
    size_t nopts = 0;
    for (const PQconninfoOption *o = p->opts; o->keyword; o++)
        nopts++;
    /* Room for every option, hostaddr and port added, the fallback name, and NULL. */
    char **k = calloc(nopts + 4, sizeof(*k));
    char **v = calloc(nopts + 4, sizeof(*v));
    char *host = NULL, *hostaddr = NULL, *port = NULL;
    size_t n = 0;
    bool rewrite = false, have_fallback = false;
    for (size_t i = 0; i < p->nhosts; i++)
        rewrite |= p->resolve[i];
    if (!k || !v)
        goto oom;
    int lists = rewrite ? plan_lists(p, &host, &hostaddr, &port) : 0;
    if (lists == -1) {
        snprintf(err, errlen, "no address found for any database host");
        free(k);
        free(v);
        return -1;
    }
    if (lists != 0)
        goto oom;
    for (const PQconninfoOption *o = p->opts; o->keyword; o++) {
        const char *val = o->val;
        if (rewrite && strcmp(o->keyword, "host") == 0)
            val = host;
        else if (rewrite && strcmp(o->keyword, "hostaddr") == 0)
            val = hostaddr;
        else if (rewrite && strcmp(o->keyword, "port") == 0)
            val = p->nports == p->nhosts ? port : o->val;
        if (strcmp(o->keyword, "options") == 0 && !val)
            val = pg_session_options();
        if (strcmp(o->keyword, "fallback_application_name") == 0 && val)
            have_fallback = true;
        if (!val)
            continue;
        k[n] = strdup(o->keyword);
        v[n] = strdup(val);
        if (!k[n] || !v[n]) {
            n++;
            goto oom;
        }
        n++;
    }
    if (!have_fallback && app_name) {
        k[n] = strdup("fallback_application_name");
        v[n] = strdup(app_name);
        if (!k[n] || !v[n]) {
            n++;
            goto oom;
        }
        n++;
    }
    free(host);
    free(hostaddr);
    free(port);
    *keys = k;
    *vals = v;
    return 0;
oom:
    snprintf(err, errlen, "out of memory");
    for (size_t i = 0; i < n; i++) {
        free(k[i]);
        free(v[i]);
    }
    free(k);
    free(v);
    free(host);
    free(hostaddr);
    free(port);
    return -1;
}

/* ---- the dial ---- */

struct pg_lookup {
    struct pg_dial *dial; /* NULL once the dial was cancelled: the callback only frees */
    struct evdns_getaddrinfo_request *req;
    size_t host;
};

struct pg_dial {
    struct pg_dial_plan plan;
    bool plan_ok;
    struct pg_lookup *lookups[PG_DIAL_MAX_HOSTS]; /* in flight */
    size_t pending;                               /* lookups in flight, +1 while starting */
    struct event *done;                           /* activated when the last one answers */
    char *app_name;
    pg_dial_cb cb;
    void *arg;
    char err[256];                                /* the plan's error, or the last lookup's */
};

static void dial_free(struct pg_dial *d)
{
    for (size_t i = 0; i < PG_DIAL_MAX_HOSTS; i++) {
        struct pg_lookup *lk = d->lookups[i];
        if (!lk)
            continue;
        /* evdns answers a cancel through the callback (perhaps later): that frees lk. */
        lk->dial = NULL;
        evdns_getaddrinfo_cancel(lk->req);
    }
    if (d->done)
        event_free(d->done);
    pg_dial_plan_free(&d->plan);
    free(d->app_name);
    free(d);
}

static void dial_lookup_done(struct pg_dial *d)
{
    if (--d->pending == 0)
        event_active(d->done, EV_TIMEOUT, 1);
}

static void dial_on_lookup(int result, struct evutil_addrinfo *res, void *arg)
{
    struct pg_lookup *lk = arg;
    struct pg_dial *d = lk->dial;
    size_t i = lk->host;
    free(lk);
    if (!d) {
        if (res)
            evutil_freeaddrinfo(res);
        return;
    }
    d->lookups[i] = NULL;
    if (result != 0) {
        snprintf(d->err, sizeof(d->err), "cannot resolve database host %s: %s",
                 d->plan.hosts[i], evutil_gai_strerror(result));
        log_debug("store", "%s", d->err);
    }
    for (struct evutil_addrinfo *ai = res; ai; ai = ai->ai_next) {
        char text[INET6_ADDRSTRLEN];
        const void *a = ai->ai_family == AF_INET
                            ? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
                            : (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
        if ((ai->ai_family == AF_INET || ai->ai_family == AF_INET6) &&
            evutil_inet_ntop(ai->ai_family, a, text, sizeof(text)))
            pg_dial_plan_add_addr(&d->plan, i, text);
    }
    if (res)
        evutil_freeaddrinfo(res);
    dial_lookup_done(d);
}

static void dial_on_done(evutil_socket_t fd, short what, void *arg)
{
    struct pg_dial *d = arg;
    PGconn *conn = NULL;
    char err[256];
    snprintf(err, sizeof(err), "%s", d->err);
    if (d->plan_ok) {
        char **keys, **vals, perr[128];
        if (pg_dial_plan_params(&d->plan, d->app_name, &keys, &vals, perr, sizeof(perr)) == 0) {
            conn = PQconnectStartParams((const char *const *)keys, (const char *const *)vals, 0);
            pg_dial_params_free(keys, vals);
            if (!conn)
                snprintf(err, sizeof(err), "out of memory");
        } else if (!err[0]) {
            snprintf(err, sizeof(err), "%s", perr);
        }
    }
    pg_dial_cb cb = d->cb;
    void *cb_arg = d->arg;
    dial_free(d);
    cb(conn, conn ? NULL : err, cb_arg);
}

struct pg_dial *pg_dial_start(struct event_base *base, struct evdns_base *dns,
                              const char *conninfo, const char *app_name, pg_dial_cb cb,
                              void *arg)
{
    struct pg_dial *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    d->cb = cb;
    d->arg = arg;
    d->app_name = app_name ? strdup(app_name) : NULL;
    d->done = event_new(base, -1, 0, dial_on_done, d);
    if ((app_name && !d->app_name) || !d->done)
        goto fail;
    d->pending = 1; /* held until every lookup has started: a quick answer cannot finish */
    d->plan_ok = pg_dial_plan_init(&d->plan, conninfo, d->err, sizeof(d->err)) >= 0;
    for (size_t i = 0; d->plan_ok && i < d->plan.nhosts; i++) {
        if (!d->plan.resolve[i])
            continue;
        if (!dns) {
            snprintf(d->err, sizeof(d->err), "cannot resolve database host %s: no resolver",
                     d->plan.hosts[i]);
            continue;
        }
        struct pg_lookup *lk = calloc(1, sizeof(*lk));
        if (!lk) {
            snprintf(d->err, sizeof(d->err), "out of memory");
            continue;
        }
        lk->dial = d;
        lk->host = i;
        d->lookups[i] = lk;
        d->pending++;
        /* What libpq asks getaddrinfo() for: any family, no AI_ADDRCONFIG. */
        struct evutil_addrinfo hints = {.ai_family = AF_UNSPEC,
                                        .ai_socktype = SOCK_STREAM,
                                        .ai_protocol = IPPROTO_TCP};
        struct evdns_getaddrinfo_request *req =
            evdns_getaddrinfo(dns, d->plan.hosts[i], NULL, &hints, dial_on_lookup, lk);
        /* NULL: answered already (an /etc/hosts name, an error), and lk is gone. */
        if (!req)
            continue;
        lk->req = req;
        if (evdns_base_count_nameservers(dns) == 0) {
            /* evdns would hold the query until a nameserver appears: none will. */
            snprintf(d->err, sizeof(d->err),
                     "cannot resolve database host %s: no DNS nameservers configured",
                     d->plan.hosts[i]);
            d->lookups[i] = NULL;
            lk->dial = NULL;
            evdns_getaddrinfo_cancel(req);
            d->pending--;
        }
    }
    dial_lookup_done(d);
    return d;
fail:
    if (d->done)
        event_free(d->done);
    free(d->app_name);
    free(d);
    return NULL;
}

void pg_dial_cancel(struct pg_dial *d)
{
    if (d)
        dial_free(d);
}

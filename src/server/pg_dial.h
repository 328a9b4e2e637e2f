/* Starting a libpq connection from the event loop without a blocking DNS lookup.
 *
 * PQconnectStart resolves the conninfo's host names itself, with getaddrinfo(): on the
 * loop that one call stops every relay, tunnel and API request for as long as DNS takes
 * (seconds, when a nameserver is slow or gone). The loop's connections (store_pg's write
 * connection, cluster_sync) therefore dial through here: the host names are resolved
 * with evdns first and handed to libpq as hostaddr, so libpq resolves nothing, and still
 * uses host for TLS verify-full and the password file. A name with several addresses
 * becomes as many entries, tried in order as libpq tries a name's addresses.
 *
 * Hosts the conninfo leaves out come from PGHOST, PGHOSTADDR and PGPORT, as in libpq.
 * Names in a `service=` entry are not seen here (libpq reads that file itself); the
 * documented form is a URL or key=value string that names its hosts. */
#ifndef PORTMUX_PG_DIAL_H
#define PORTMUX_PG_DIAL_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>

struct event_base;
struct evdns_base;

/* Hosts one conninfo may list, and addresses kept per resolved name (DNS answers are the
 * peer's: what they cost here is bounded). */
#define PG_DIAL_MAX_HOSTS 16
#define PG_DIAL_MAX_ADDRS 8

/* The libpq `options` each of our connections starts with, unless the URL or PGOPTIONS
 * gives its own: a statement kept waiting this long (a lock an operator holds on a table,
 * a stalled database) is cancelled by the server itself. The node gives up on a silent
 * connection after 20 s (cluster_sync) or 1.5 s (writes) and opens another; without
 * this, the backend it left kept waiting on the lock, one more for each retry, until
 * the database ran out of connections. */
#define PG_SESSION_OPTIONS "-c statement_timeout=15000"

/* PG_SESSION_OPTIONS, or NULL when PGOPTIONS is set (libpq applies that one). */
const char *pg_session_options(void);

/* ---- the plan: pure, unit-tested (tests/unit/test_pg_dial.c) ---- */

struct pg_dial_plan {
    PQconninfoOption *opts;            /* PQconninfoParse's; the other options pass as-is */
    char *hosts[PG_DIAL_MAX_HOSTS];    /* the host list, split at commas */
    size_t nhosts;
    char *ports[PG_DIAL_MAX_HOSTS];    /* the port list: none, one for all, or one per host */
    size_t nports;
    bool resolve[PG_DIAL_MAX_HOSTS];   /* a name for evdns (not empty, a path or an IP) */
    char *addrs[PG_DIAL_MAX_HOSTS][PG_DIAL_MAX_ADDRS]; /* numeric addresses found */
    size_t naddrs[PG_DIAL_MAX_HOSTS];
};

/* Parses conninfo (a URL or key=value string; host, hostaddr and port it does not set
 * are taken from PGHOST, PGHOSTADDR and PGPORT). Returns how many hosts need a lookup
 * (0: none, e.g. IP addresses, a socket directory, or hostaddr given), or -1 with err
 * set (unparsable, too many hosts). On -1 nothing needs freeing. */
int pg_dial_plan_init(struct pg_dial_plan *p, const char *conninfo, char *err, size_t errlen);

/* Records one numeric address found for host i (beyond PG_DIAL_MAX_ADDRS: ignored). */
void pg_dial_plan_add_addr(struct pg_dial_plan *p, size_t i, const char *addr);

/* The keyword/value arrays for PQconnectStartParams(keys, vals, 0), NULL-terminated, with
 * host, hostaddr and port rewritten so that each resolved address is an entry of its own
 * and fallback_application_name set to app_name. A name with no address found is left
 * out. Returns 0, or -1 with err set (no host left: every name failed to resolve; out of
 * memory). *keys, *vals and the strings they hold are freed by pg_dial_params_free. */
int pg_dial_plan_params(const struct pg_dial_plan *p, const char *app_name, char ***keys,
                        char ***vals, char *err, size_t errlen);
void pg_dial_params_free(char **keys, char **vals);

void pg_dial_plan_free(struct pg_dial_plan *p);

/* ---- the dial: on the loop ---- */

struct pg_dial;

/* Called once from the loop (never from inside pg_dial_start), unless pg_dial_cancel came
 * first. conn is the started connection -- PQconnectPoll drives it from here, the socket
 * first wanted writable -- and the callee owns it; or NULL with err saying why (a name
 * that did not resolve, an unparsable conninfo, out of memory). The dial is freed by the
 * time cb runs. */
typedef void (*pg_dial_cb)(PGconn *conn, const char *err, void *arg);

/* Resolves conninfo's host names with dns and then starts the connection, with
 * fallback_application_name app_name. NULL only when out of memory (cb is not called). */
struct pg_dial *pg_dial_start(struct event_base *base, struct evdns_base *dns,
                              const char *conninfo, const char *app_name, pg_dial_cb cb,
                              void *arg);

/* Stops a dial whose cb has not run: cb never runs, lookups in flight are cancelled. */
void pg_dial_cancel(struct pg_dial *d);

#endif

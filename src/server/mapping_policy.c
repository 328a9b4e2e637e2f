/* Policy of one mapping: allow list, connection limit, rate limit, PROXY header. */
#include "mapping_policy.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <event2/bufferevent.h>

#include "config.h"
#include "log.h"
#include "mapping_types.h"
#include "proxy_header.h"
#include "server.h"

/* A refused connection is logged at most once per mapping in this many seconds. */
#define MAPPING_REFUSED_LOG_SECONDS 10
/* libevent's rate-limit groups refill every tick; 100 ms keeps the bursts small. */
#define MAPPING_RL_TICK_MS 100

int mapping_max_connections(const struct mapping *m)
{
    return m->rec.max_connections > 0 ? m->rec.max_connections
                                      : m->srv->cfg->max_connections_per_mapping;
}

int mapping_conn_proxy_header(const struct mapping_conn *mc, int fd, unsigned char *buf)
{
    if (!mc->mapping || mc->mapping->rec.proxy_protocol == 0)
        return 0;
    struct sockaddr_storage local;
    socklen_t len = sizeof(local);
    if (getsockname(fd, (struct sockaddr *)&local, &len) < 0)
        memset(&local, 0, sizeof(local)); /* the header says UNKNOWN / LOCAL then */
    int n = proxy_header_build(mc->mapping->rec.proxy_protocol,
                               (const struct sockaddr *)&mc->peer,
                               (const struct sockaddr *)&local, buf);
    return n > 0 ? n : 0;
}

bool mapping_policy_allows(const struct mapping *m, const struct sockaddr *sa)
{
    /* Keyed on the text, not allow_len: a stored list none of which parses (a hand-edited
     * database) lets nobody in rather than everybody. */
    if (!m->rec.allow_from[0])
        return true;
    if (!sa || (sa->sa_family != AF_INET && sa->sa_family != AF_INET6))
        return false;
    for (size_t i = 0; i < m->allow_len; i++)
        if (netaddr_cidr_match(&m->allow[i], sa))
            return true;
    return false;
}

/* A peer can make us refuse as often as it connects: one line per mapping per 10 s, with
 * the count of those left out. */
void mapping_policy_log_refused(struct mapping *m, const struct sockaddr *sa, const char *why)
{
    unsigned long held;
    if (!log_limit_take(&m->refused_log, time(NULL), MAPPING_REFUSED_LOG_SECONDS, &held))
        return;
    char addr[64];
    netaddr_format(sa, addr, sizeof(addr));
    if (held)
        log_warn("mapping", "port %d: connection from %s refused (%s); %lu more refused "
                 "since the last line", m->rec.port, addr, why, held);
    else
        log_warn("mapping", "port %d: connection from %s refused (%s)", m->rec.port, addr,
                 why);
}


static uint64_t mapping_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void mapping_parse_allow(struct mapping *m)
{
    char text[sizeof(m->rec.allow_from)];
    memcpy(text, m->rec.allow_from, sizeof(text));
    m->allow_len = 0;
    char *save = NULL;
    for (char *tok = strtok_r(text, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (m->allow_len < STORE_ALLOW_MAX &&
            netaddr_cidr_parse(tok, &m->allow[m->allow_len]) == 0)
            m->allow_len++;
        else
            log_error("mapping", "port %d: stored allow_from entry \"%.60s\" ignored",
                      m->rec.port, tok);
    }
}

/* Tells every live connection that the policy changed (it may hold a rate-limit group). */
static void mapping_notify_conns(struct mapping *m)
{
    struct mapping_conn *mc;
    TAILQ_FOREACH(mc, &m->conns, link)
        if (mc->policy_changed)
            mc->policy_changed(mc);
}

/* rate_limit: the token buckets the splice relay draws from, and the group bufferevents
 * join. Without a limit there is no group, so unlimited mappings pay nothing for it. */
static int mapping_apply_rate(struct mapping *m)
{
    uint64_t rate = (uint64_t)m->rec.rate_limit, now = mapping_now_ns();
    for (int d = 0; d < 2; d++)
        token_bucket_set_rate(&m->bucket[d], rate, now);
    if (rate == 0) {
        struct bufferevent_rate_limit_group *old = m->rl_group;
        m->rl_group = NULL;
        if (old) {
            mapping_notify_conns(m); /* they leave the group before it goes */
            bufferevent_rate_limit_group_free(old);
        }
        return 0;
    }
    size_t per_tick = (size_t)(rate * MAPPING_RL_TICK_MS / 1000);
    if (per_tick == 0)
        per_tick = 1;
    size_t burst = (size_t)(rate / 4) > per_tick ? (size_t)(rate / 4) : per_tick;
    struct timeval tick = {0, MAPPING_RL_TICK_MS * 1000};
    struct ev_token_bucket_cfg *cfg = ev_token_bucket_cfg_new(per_tick, burst, per_tick,
                                                              burst, &tick);
    if (!cfg)
        return -1;
    int rc = 0;
    if (m->rl_group) {
        rc = bufferevent_rate_limit_group_set_cfg(m->rl_group, cfg);
    } else {
        m->rl_group = bufferevent_rate_limit_group_new(m->srv->base, cfg);
        rc = m->rl_group ? 0 : -1;
        if (m->rl_group)
            mapping_notify_conns(m);
    }
    ev_token_bucket_cfg_free(cfg);
    return rc;
}

/* Closes the live connections the new allow_from or max_connections no longer admit:
 * those from outside the list, then the newest beyond the limit. */
static void mapping_enforce_on_live(struct mapping *m)
{
    struct mapping_conn *mc = TAILQ_FIRST(&m->conns), *next;
    for (; mc; mc = next) {
        next = TAILQ_NEXT(mc, link);
        if (mc->peer.ss_family != 0 && !mapping_policy_allows(m, (struct sockaddr *)&mc->peer))
            mc->abort(mc);
    }
    while (m->stats.active > (uint64_t)mapping_max_connections(m) &&
           (mc = TAILQ_LAST(&m->conns, mapping_conn_list)) != NULL)
        mc->abort(mc);
}

/* Applies rec's policy; with live set, to the open connections as well. */
void mapping_policy_apply(struct mapping *m, bool live)
{
    mapping_parse_allow(m);
    if (mapping_apply_rate(m) < 0)
        log_error("mapping", "port %d: cannot set up rate_limit for bufferevents (out of "
                  "memory); the splice relay still keeps it", m->rec.port);
    if (live)
        mapping_enforce_on_live(m);
}

void mapping_policy_free(struct mapping *m)
{
    /* Every member left the group as its connection ended (bridge_release,
     * tstream_end), not in bufferevent_free's later finalizer. */
    if (m->rl_group)
        bufferevent_rate_limit_group_free(m->rl_group);
    m->rl_group = NULL;
}

/* The live registry: one evconnlistener per mapping, counters, and create/remove/restore
 * kept consistent with the store (bind first, then write; on any failure undo both). */
#include "mapping.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/listener.h>

#include "accept_guard.h"
#include "client_name.h"
#include "clients.h"
#include "config.h"
#include "fd_limit.h"
#include "log.h"
#include "log_limit.h"
#include "mapping_policy.h"
#include "proxy_wait.h"
#include "server.h"

#define MAPPING_BACKLOG 1024
/* Descriptors a public port may never take: they stay for the API, the tunnel, the
 * database and the target sockets and pipes of connections already accepted. However a
 * loop or a flood fills the public ports, /health still answers. */
#define MAPPING_FD_RESERVE 64

/* A tunnel client with a live session, as the tunnel told us (no polling). */
struct mapping_client_up {
    TAILQ_ENTRY(mapping_client_up) link;
    unsigned sessions;            /* up notices not yet matched by a down */
    char name[];
};

struct mapping_registry {
    struct server *srv;
    TAILQ_HEAD(, mapping) list;
    /* The same mappings by port: a lookup by port is the API's, a port-0 create's (once
     * per port of the range) and a cluster resync's (once per row), and a walk of the list
     * made those O(mappings) each. 65,536 pointers, of which only the pages of ports in
     * use are ever touched. */
    struct mapping **by_port;
    TAILQ_HEAD(, mapping) creating; /* created, not stored yet (mapping_registry_create_async) */
    size_t count;
    struct mapping_handlers handlers;   /* where accepted connections go (main.c) */
    TAILQ_HEAD(, mapping_client_up) up; /* clients connected now */
    struct event *idle_sweep;           /* once a second: limits.idle_timeout, and dead
                                           sources of paused directions */
    struct log_limit idle_log, dead_log, slow_log;
};

/* A store write in flight for one mapping (m->op), and what to finish with. */
struct mapping_op {
    struct mapping_registry *reg;
    struct mapping *m;
    struct evconnlistener *l;      /* bound for the write (disabled), attached on success */
    struct mapping_record next;    /* update: the record to apply once stored */
    mapping_done_fn done;
    void *arg;
    /* create with port 0: this node picked the port, and target_port followed it */
    bool picked, default_target;
};

static struct mapping_client_up *mapping_find_up(const struct mapping_registry *reg,
                                                 const char *name)
{
    struct mapping_client_up *u;
    TAILQ_FOREACH(u, &reg->up, link) {
        if (strcmp(u->name, name) == 0)
            return u;
    }
    return NULL;
}

void mapping_registry_set_handlers(struct mapping_registry *reg,
                                   const struct mapping_handlers *h)
{
    reg->handlers = *h;
}

void mapping_registry_client_up(struct mapping_registry *reg, const char *name)
{
    struct mapping_client_up *u = mapping_find_up(reg, name);
    if (!u) {
        size_t len = strlen(name);
        if (!(u = calloc(1, sizeof(*u) + len + 1))) {
            log_error("mapping", "out of memory noting client \"%s\" as connected", name);
            return;
        }
        memcpy(u->name, name, len + 1);
        TAILQ_INSERT_TAIL(&reg->up, u, link);
    }
    u->sessions++;
}

void mapping_registry_client_down(struct mapping_registry *reg, const char *name)
{
    struct mapping_client_up *u = mapping_find_up(reg, name);
    if (u && --u->sessions == 0) {
        TAILQ_REMOVE(&reg->up, u, link);
        free(u);
    }
}

bool mapping_registry_client_is_up(const struct mapping_registry *reg, const char *name)
{
    return mapping_find_up(reg, client_name_or_default(name)) != NULL;
}

static int64_t mapping_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec;
}

void mapping_conn_begin(struct mapping *m, struct mapping_conn *mc,
                        void (*abort_fn)(struct mapping_conn *mc))
{
    mc->mapping = m;
    mc->abort = abort_fn;
    mc->policy_changed = NULL;
    mc->unwatched_source_dead = NULL;
    mc->held_bytes = NULL;
    mc->bytes_in = mc->bytes_out = 0;
    mc->idle_bytes = 0;
    mc->idle_since = 0; /* the sweep's first look starts the clock: no clock read here */
    memset(&mc->peer, 0, sizeof(mc->peer));
    if (m->accepting)
        memcpy(&mc->peer, m->accepting,
               m->accepting->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                    : sizeof(struct sockaddr_in));
    clock_gettime(CLOCK_MONOTONIC, &mc->opened);
    TAILQ_INSERT_TAIL(&m->conns, mc, link);
    m->stats.active++;
    m->stats.total++;
    log_debug("mapping", "port %d: connection opened (%llu active)", m->rec.port,
              (unsigned long long)m->stats.active);
}

void mapping_conn_end(struct mapping_conn *mc, bool failed)
{
    struct mapping *m = mc->mapping;
    if (!m)
        return;
    TAILQ_REMOVE(&m->conns, mc, link);
    m->stats.active--;
    if (failed)
        m->stats.failed++;
    mc->mapping = NULL;
    if (log_get_level() > LOGL_DEBUG)
        return;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double secs = (double)(now.tv_sec - mc->opened.tv_sec) +
                  (double)(now.tv_nsec - mc->opened.tv_nsec) / 1e9;
    log_debug("mapping", "port %d: connection %s after %.3f s, %llu bytes in, %llu bytes out",
              m->rec.port, failed ? "failed" : "closed", secs,
              (unsigned long long)mc->bytes_in, (unsigned long long)mc->bytes_out);
}

const char *mapping_target_host(const struct mapping *m)
{
    return m->rec.target_ip[0] ? m->rec.target_ip : "127.0.0.1";
}

enum mapping_status mapping_status(const struct mapping *m)
{
    if (!m->rec.enabled)
        return MAPPING_DISABLED;
    if (!m->listener)
        return MAPPING_ERROR;
    if (m->rec.use_tunnel &&
        (!m->srv->mappings || !mapping_registry_client_is_up(m->srv->mappings, m->rec.client)))
        return MAPPING_WAITING_FOR_CLIENT;
    return MAPPING_LISTENING;
}

const char *mapping_status_name(enum mapping_status s)
{
    switch (s) {
    case MAPPING_LISTENING: return "listening";
    case MAPPING_WAITING_FOR_CLIENT: return "waiting_for_client";
    case MAPPING_ERROR: return "error";
    case MAPPING_DISABLED: return "disabled";
    }
    return "error";
}

/* Refused by allow_from: reset (SO_LINGER 0) rather than closed, so the peer learns
 * nothing was there and no TIME_WAIT is left behind. */
static void mapping_reset(evutil_socket_t fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    evutil_closesocket(fd);
}

bool mapping_fd_in_reserve(evutil_socket_t fd)
{
    /* A small limit keeps a quarter: with none, the peers of a 128-descriptor server
     * took every one and the API stopped answering. */
    return fd_limit_in_reserve(fd, MAPPING_FD_RESERVE, 4);
}

/* A public connection whose source is known: the peer's, or the client a trusted
 * balancer's PROXY header names. */
static void mapping_accept_from(evutil_socket_t fd, const struct sockaddr *sa,
                                socklen_t socklen, void *arg)
{
    struct mapping *m = arg;
    struct server *srv = m->srv;
    if (mapping_fd_in_reserve(fd)) {
        m->stats.refused_limit++;
        srv->limits.descriptors++;
        log_debug("mapping", "port %d: connection refused, descriptors nearly exhausted",
                  m->rec.port);
        evutil_closesocket(fd);
        return;
    }
    if (!mapping_policy_allows(m, sa)) {
        m->stats.refused_allow++;
        mapping_policy_log_refused(m, sa, "not in allow_from");
        mapping_reset(fd);
        return;
    }
    if (m->stats.active >= (uint64_t)mapping_max_connections(m)) {
        /* Refused by the limit: closed at once, counted apart from target failures. */
        m->stats.refused_limit++;
        srv->limits.mapping_connections++;
        log_debug("mapping", "port %d: connection refused, %d connections open (limit)",
                  m->rec.port, mapping_max_connections(m));
        evutil_closesocket(fd);
        return;
    }
    /* mapping_conn_begin, called from what follows, records the peer from here. */
    m->accepting = sa;
    const struct mapping_handlers *h = &srv->mappings->handlers;
    if (!m->rec.use_tunnel && h->direct) {
        h->direct(m, fd);
    } else if (m->rec.use_tunnel && h->tunnel) {
        h->tunnel(h->tunnel_ctx, m, fd);
    } else {
        /* A stored tunnel mapping while the tunnel is off: count the refusal. */
        struct mapping_conn mc;
        mapping_conn_begin(m, &mc, NULL);
        mapping_conn_end(&mc, true);
        mapping_dial_failed(m, "the tunnel is off (tunnel.enabled: false)");
        evutil_closesocket(fd);
    }
    m->accepting = NULL;
}

static void mapping_accept_cb(struct evconnlistener *l, evutil_socket_t fd,
                              struct sockaddr *sa, int socklen, void *arg)
{
    struct mapping *m = arg;
    if (!proxy_waits_trusted(m->srv->cfg, sa)) {
        mapping_accept_from(fd, sa, (socklen_t)socklen, m);
        return;
    }
    /* Those waiting hold a descriptor each, like open connections: both within the
     * mapping's limit. */
    uint64_t max = (uint64_t)mapping_max_connections(m);
    size_t room = m->stats.active < max ? (size_t)(max - m->stats.active) : 0;
    if (room == 0 || mapping_fd_in_reserve(fd)) {
        /* The limit and the descriptor reserve refuse (and count) there, before a
         * connection could hold a descriptor for up to PROXY_WAIT_SECONDS waiting. */
        mapping_accept_from(fd, sa, (socklen_t)socklen, m);
        return;
    }
    if (!m->proxy_waits) {
        char what[32];
        snprintf(what, sizeof(what), "port %d", m->rec.port);
        m->proxy_waits = proxy_waits_new(m->srv->base, what, mapping_accept_from, m,
                                         &m->srv->limits.proxy_header);
        if (!m->proxy_waits) {
            log_error("mapping", "port %d: out of memory accepting a connection", m->rec.port);
            evutil_closesocket(fd);
            return;
        }
    }
    proxy_waits_add(m->proxy_waits, fd, sa, (socklen_t)socklen, room);
}

static void mapping_accept_error_cb(struct evconnlistener *l, void *arg)
{
    struct mapping *m = arg;
    if (m->accept_guard)
        accept_guard_on_error(m->accept_guard);
}

/* Attaches a new listener (and its guard) to m. */
static void mapping_attach_listener(struct mapping *m, struct evconnlistener *l)
{
    char what[32];
    snprintf(what, sizeof(what), "port %d", m->rec.port);
    m->listener = l;
    evconnlistener_set_cb(l, mapping_accept_cb, m);
    m->accept_guard = accept_guard_new(m->srv->base, l, "mapping", what);
}

static void mapping_detach_listener(struct mapping *m)
{
    accept_guard_free(m->accept_guard);
    m->accept_guard = NULL;
    proxy_waits_free(m->proxy_waits);
    m->proxy_waits = NULL;
    if (m->listener)
        evconnlistener_free(m->listener);
    m->listener = NULL;
}

/* Binds mappings.bind_addr:port ourselves (not evconnlistener_new_bind) to keep the exact
 * errno for the error status, then hands the socket to an evconnlistener. */
static struct evconnlistener *mapping_listen(struct mapping *m, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    int fd = -1;
    if (netaddr_ip_sockaddr(m->srv->cfg->mappings_bind_addr, (uint16_t)m->rec.port, &ss,
                            &sslen) < 0) {
        errno = EINVAL;
        goto fail;
    }
    fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    /* Listeners leave the reserve to the API too: a restore of more mappings than the
     * limit allows took every descriptor, the API could not start, and neither could
     * any later start (no way left to remove a mapping). Those ports keep status error. */
    if (mapping_fd_in_reserve(fd)) {
        errno = EMFILE;
        goto fail;
    }
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    /* "::" means both families whatever net.ipv6.bindv6only says; "::1" only IPv6. */
    if (ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    /* Every accepted connection inherits it (Linux copies the listener's TCP options
     * into the child), so neither relay spends a setsockopt per connection on it. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&ss, sslen) < 0 || listen(fd, MAPPING_BACKLOG) < 0)
        goto fail;
    struct evconnlistener *l = evconnlistener_new(m->srv->base, mapping_accept_cb, m,
                                                  LEV_OPT_CLOSE_ON_FREE, -1, fd);
    if (!l)
        goto fail;
    evconnlistener_set_error_cb(l, mapping_accept_error_cb);
    return l;
fail:;
    int e = errno;
    snprintf(err, errlen, "cannot listen on port %d: %s", m->rec.port, strerror(e));
    if (fd >= 0)
        close(fd);
    errno = e; /* for mapping_listen_failure */
    return NULL;
}

/* Why mapping_listen just failed: the port (in use, not allowed), or the server itself
 * (out of descriptors or memory, which every other port would meet too). */
static enum mapping_result mapping_listen_failure(enum mapping_result port_fault)
{
    int e = errno;
    return e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM ? MAPPING_E_RESOURCES
                                                                     : port_fault;
}

static struct mapping *mapping_new(struct server *srv, const struct mapping_record *rec)
{
    struct mapping *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    m->rec = *rec;
    m->srv = srv;
    TAILQ_INIT(&m->conns);
    mapping_policy_apply(m, false);
    return m;
}

/* Closes every live connection; each abort unlinks itself through mapping_conn_end. */
static void mapping_abort_conns(struct mapping *m)
{
    struct mapping_conn *mc;
    while ((mc = TAILQ_FIRST(&m->conns)) != NULL)
        mc->abort(mc);
}

static void mapping_free(struct mapping *m)
{
    if (!m)
        return;
    /* Only at shutdown, after store_fail_pending, can a write still be open here: the
     * store will not call back, so its bound listener goes with the mapping. */
    if (m->op) {
        if (m->op->l)
            evconnlistener_free(m->op->l);
        free(m->op);
    }
    mapping_detach_listener(m);
    mapping_abort_conns(m);
    mapping_policy_free(m);
    free(m);
}

/* Every mapping enters and leaves the registry through these two, which keep the list,
 * the count and the by-port index together. */
static void mapping_registry_link(struct mapping_registry *reg, struct mapping *m)
{
    TAILQ_INSERT_TAIL(&reg->list, m, link);
    reg->by_port[(uint16_t)m->rec.port] = m;
    reg->count++;
}

static void mapping_registry_unlink(struct mapping_registry *reg, struct mapping *m)
{
    TAILQ_REMOVE(&reg->list, m, link);
    if (reg->by_port[(uint16_t)m->rec.port] == m)
        reg->by_port[(uint16_t)m->rec.port] = NULL;
    reg->count--;
}

/* Once a second, each connection's byte counts are compared with the last look, so the
 * hot paths pay nothing for what follows:
 * - limits.idle_timeout: a connection that has not moved for that long is closed. Without
 *   it a public peer that vanished kept its descriptors, pipe and buffers for good.
 * - A connection that has not moved for MAPPING_STALL_CHECK_S is asked whether a paused
 *   direction's source is dead: a peer that reset while its bytes waited on a target that
 *   does not read was heard by nothing (its socket is not watched while paused), and held
 *   the connection until the target read or closed, whatever idle_timeout says. */
#define MAPPING_STALL_CHECK_S 2
/* - Tunnel streams hold up to a window (256 KiB) each for a public peer that does not
 *   read, in the server's own memory: 10,000 peers that ask a tunnelled web app for a big
 *   file and never read would hold 2.5 GB. Past MAPPING_HELD_BUDGET_FACTOR times
 *   tunnel.session_buffer_limit across the server, connections unmoved for
 *   MAPPING_STALL_CHECK_S that hold at least MAPPING_HELD_CLOSE_MIN are closed until the
 *   total is back within it; a peer that reads is never one of them. */
#define MAPPING_HELD_BUDGET_FACTOR 4
#define MAPPING_HELD_CLOSE_MIN (64 * 1024)

static void mapping_sweep_log(struct log_limit *l, unsigned long closed, const char *what,
                              int timeout)
{
    unsigned long held;
    if (closed && log_limit_take(l, time(NULL), 10, &held))
        log_info("mapping", "closed %lu connection(s) %s%d s (%lu more such closes in the "
                 "last 10 s not logged)", closed, what, timeout, held);
}

/* Closes unmoved connections holding the most memory-bound bytes for peers that do not
 * read, while the server's total is past its budget (see MAPPING_HELD_BUDGET_FACTOR). */
static unsigned long mapping_close_slow_readers(struct mapping_registry *reg, size_t held,
                                               int64_t now)
{
    size_t budget = (size_t)MAPPING_HELD_BUDGET_FACTOR *
                    (size_t)(reg->srv->cfg->session_buffer_limit > 0
                                 ? reg->srv->cfg->session_buffer_limit
                                 : 64 << 20);
    unsigned long closed = 0;
    struct mapping *m;
    TAILQ_FOREACH(m, &reg->list, link) {
        struct mapping_conn *mc, *next;
        for (mc = TAILQ_FIRST(&m->conns); mc && held > budget; mc = next) {
            next = TAILQ_NEXT(mc, link);
            if (!mc->held_bytes || !mc->abort || mc->idle_since == 0 ||
                now - mc->idle_since < MAPPING_STALL_CHECK_S)
                continue;
            size_t h = mc->held_bytes(mc);
            if (h < MAPPING_HELD_CLOSE_MIN)
                continue;
            held -= h < held ? h : held;
            closed++;
            mc->abort(mc);
        }
    }
    return closed;
}

static void mapping_idle_sweep_cb(evutil_socket_t fd, short what, void *arg)
{
    struct mapping_registry *reg = arg;
    int timeout = reg->srv->cfg->idle_timeout;
    int64_t now = mapping_now_s();
    unsigned long idle = 0, dead = 0;
    size_t held = 0;
    struct mapping *m;
    TAILQ_FOREACH(m, &reg->list, link) {
        struct mapping_conn *mc, *next;
        for (mc = TAILQ_FIRST(&m->conns); mc; mc = next) {
            next = TAILQ_NEXT(mc, link);
            uint64_t moved = mc->bytes_in + mc->bytes_out;
            if (moved != mc->idle_bytes || mc->idle_since == 0) {
                mc->idle_bytes = moved;
                mc->idle_since = now;
            } else if (mc->abort && timeout > 0 && now - mc->idle_since >= timeout) {
                idle++;
                mc->abort(mc); /* unlinks mc; next stays valid */
                continue;
            } else if (mc->abort && now - mc->idle_since >= MAPPING_STALL_CHECK_S &&
                       mc->unwatched_source_dead && mc->unwatched_source_dead(mc)) {
                dead++;
                mc->abort(mc);
                continue;
            }
            if (mc->held_bytes)
                held += mc->held_bytes(mc);
        }
    }
    unsigned long slow = mapping_close_slow_readers(reg, held, now);
    reg->srv->limits.idle_closed += idle;
    reg->srv->limits.dead_source_closed += dead;
    reg->srv->limits.slow_reader_closed += slow;
    mapping_sweep_log(&reg->slow_log, slow, "that held bytes for a peer not reading them, the "
                      "server's total past 4 x tunnel.session_buffer_limit, unmoved for ",
                      MAPPING_STALL_CHECK_S);
    mapping_sweep_log(&reg->idle_log, idle, "after limits.idle_timeout: no byte either way for ",
                      timeout);
    mapping_sweep_log(&reg->dead_log, dead, "whose peer reset while nothing read it (its "
                      "bytes waiting on the other side, or after its FIN), unmoved for ",
                      MAPPING_STALL_CHECK_S);
}

struct mapping_registry *mapping_registry_new(struct server *srv)
{
    struct mapping_registry *reg = calloc(1, sizeof(*reg));
    if (!reg)
        return NULL;
    reg->srv = srv;
    reg->by_port = calloc(65536, sizeof(*reg->by_port));
    /* No loop (unit tests of the registry): nothing to sweep on. */
    struct timeval one_second = {1, 0};
    if (srv->base)
        reg->idle_sweep = event_new(srv->base, -1, EV_PERSIST, mapping_idle_sweep_cb, reg);
    if (!reg->by_port || (srv->base && (!reg->idle_sweep ||
                                        event_add(reg->idle_sweep, &one_second) != 0))) {
        if (reg->idle_sweep)
            event_free(reg->idle_sweep);
        free(reg->by_port);
        free(reg);
        return NULL;
    }
    TAILQ_INIT(&reg->list);
    TAILQ_INIT(&reg->creating);
    TAILQ_INIT(&reg->up);
    return reg;
}

void mapping_registry_free(struct mapping_registry *reg)
{
    if (!reg)
        return;
    struct mapping *m;
    while ((m = TAILQ_FIRST(&reg->list)) != NULL) {
        mapping_registry_unlink(reg, m);
        mapping_free(m);
    }
    while ((m = TAILQ_FIRST(&reg->creating)) != NULL) {
        TAILQ_REMOVE(&reg->creating, m, link);
        mapping_free(m);
    }
    struct mapping_client_up *u;
    while ((u = TAILQ_FIRST(&reg->up)) != NULL) {
        TAILQ_REMOVE(&reg->up, u, link);
        free(u);
    }
    if (reg->idle_sweep)
        event_free(reg->idle_sweep);
    free(reg->by_port);
    free(reg);
}

static int mapping_restore_one(const struct mapping_record *rec, void *arg)
{
    struct mapping_registry *reg = arg;
    struct mapping *m = mapping_new(reg->srv, rec);
    if (!m)
        return -1;
    struct evconnlistener *l = rec->enabled ? mapping_listen(m, m->error, sizeof(m->error))
                                            : NULL;
    if (l)
        mapping_attach_listener(m, l);
    if (!rec->enabled)
        log_info("mapping", "restored port %d, disabled", rec->port);
    else if (m->listener)
        log_info("mapping", "restored port %d -> %s%s:%d", rec->port,
                 rec->use_tunnel ? "tunnel " : "", mapping_target_host(m), rec->target_port);
    else
        log_error("mapping", "port %d kept with status error: %s", rec->port, m->error);
    if (rec->use_tunnel && reg->srv->clients && !clients_find(reg->srv->clients, rec->client))
        log_warn("mapping", "port %d: tunnel client \"%s\" does not exist; the mapping "
                 "waits until a client of that name is created", rec->port, rec->client);
    mapping_registry_link(reg, m);
    return 0;
}

int mapping_registry_restore(struct mapping_registry *reg)
{
    if (store_mapping_foreach(reg->srv->store, mapping_restore_one, reg) != STORE_OK)
        return -1;
    return 0;
}

struct mapping *mapping_registry_find(struct mapping_registry *reg, int port)
{
    return port >= 1 && port <= 65535 ? reg->by_port[port] : NULL;
}

size_t mapping_registry_count(struct mapping_registry *reg) { return reg->count; }

struct mapping *mapping_registry_first(struct mapping_registry *reg)
{
    return TAILQ_FIRST(&reg->list);
}

struct mapping *mapping_registry_next(struct mapping *m) { return TAILQ_NEXT(m, link); }

/* Attaches l when the mapping is enabled; a disabled one only proved its port free. */
static void mapping_attach_if_enabled(struct mapping *m, struct evconnlistener *l)
{
    if (m->rec.enabled)
        mapping_attach_listener(m, l);
    else
        evconnlistener_free(l);
}

/* What the API says about a write the store did not take. */
static void mapping_store_error(enum store_result sr, int port, char *err, size_t errlen)
{
    switch (sr) {
    case STORE_DUPLICATE:
        snprintf(err, errlen, "port %d is already mapped", port);
        return;
    case STORE_NOT_FOUND:
        snprintf(err, errlen, "no mapping on port %d (removed meanwhile)", port);
        return;
    case STORE_UNAVAILABLE:
        snprintf(err, errlen, "the database cannot take the write now (the server log says "
                 "why); port %d is unchanged", port);
        return;
    case STORE_CONFLICT:
        snprintf(err, errlen, "port %d was changed by another node meanwhile; nothing "
                 "changed, try again", port);
        return;
    case STORE_UNCONFIRMED:
        /* SPEC §3 says a 503 changed nothing; once the COMMIT is sent nobody can promise
         * that, so the answer says what is known. */
        snprintf(err, errlen, "the database did not confirm the write of port %d in time: "
                 "it may be stored (the list shows the outcome once this node has read it "
                 "back)", port);
        return;
    default:
        snprintf(err, errlen, "database error while storing port %d", port);
        return;
    }
}

/* A database that did not answer (PostgreSQL, §7) is told apart from one that failed:
 * the API answers 503 store_unavailable for the first, 500 for the second. */
static enum mapping_result mapping_store_failure(enum store_result sr)
{
    /* NOT_FOUND: another node removed the row while this write was on its way. */
    return sr == STORE_UNAVAILABLE || sr == STORE_UNCONFIRMED ? MAPPING_E_UNAVAILABLE
           : sr == STORE_CONFLICT                           ? MAPPING_E_BUSY
           : sr == STORE_NOT_FOUND                          ? MAPPING_E_NOT_FOUND
                                                            : MAPPING_E_STORE;
}

static struct mapping *mapping_find_creating(const struct mapping_registry *reg, int port);

/* Port 0: tries the range from its start, skipping blacklisted and mapped ports, until a
 * bind succeeds; m->rec.port (and target_port, when it defaulted) become that port. */
static struct evconnlistener *mapping_listen_any(struct mapping_registry *reg,
                                                 struct mapping *m, int from, char *err,
                                                 size_t errlen)
{
    const struct config *cfg = reg->srv->cfg;
    bool default_target = m->rec.target_port == 0;
    for (int p = from > cfg->port_from ? from : cfg->port_from; p <= cfg->port_end; p++) {
        if (!config_port_allowed(cfg, p) || mapping_registry_find(reg, p) ||
            mapping_find_creating(reg, p))
            continue;
        m->rec.port = p;
        /* A target on this host at the port about to be picked: the mapping would be its
         * own target, which the create's loop check could not see before the pick. */
        if (p == m->rec.target_port && reg->handlers.targets_self &&
            reg->handlers.targets_self(reg->srv, &m->rec))
            continue;
        struct evconnlistener *l = mapping_listen(m, err, errlen);
        if (l) {
            if (default_target)
                m->rec.target_port = p;
            return l;
        }
        if (mapping_listen_failure(MAPPING_E_EXHAUSTED) == MAPPING_E_RESOURCES)
            return NULL; /* err says why; errno still does too */
    }
    snprintf(err, errlen, "no free port left in port_range %d-%d", cfg->port_from,
             cfg->port_end);
    errno = 0; /* the range's fault, whatever the last bind said */
    return NULL;
}

/* ---- create, update, remove: bind now, store asynchronously, finish on the answer ---- */

static struct mapping_op *mapping_op_new(struct mapping_registry *reg, struct mapping *m,
                                         mapping_done_fn done, void *arg)
{
    struct mapping_op *op = calloc(1, sizeof(*op));
    if (!op)
        return NULL;
    op->reg = reg;
    op->m = m;
    op->done = done;
    op->arg = arg;
    return op;
}

/* The write that changes the stored mapping on port: its op, or NULL after done was told
 * why not (no such mapping: 404; a write of it still in flight: 409 busy). */
static struct mapping_op *mapping_op_for_port(struct mapping_registry *reg, int port,
                                              mapping_done_fn done, void *arg)
{
    char err[160];
    struct mapping *m = mapping_registry_find(reg, port);
    if (!m) {
        snprintf(err, sizeof(err), "no mapping on port %d", port);
        done(MAPPING_E_NOT_FOUND, NULL, err, arg);
        return NULL;
    }
    if (m->op) {
        snprintf(err, sizeof(err), "a change of port %d is being stored; try again", port);
        done(MAPPING_E_BUSY, NULL, err, arg);
        return NULL;
    }
    struct mapping_op *op = mapping_op_new(reg, m, done, arg);
    if (!op)
        done(MAPPING_E_STORE, NULL, "out of memory", arg);
    return op;
}

/* The write is over: the mapping is free for the next one, the caller learns the end. */
static void mapping_op_end(struct mapping_op *op, enum mapping_result r, struct mapping *m,
                           const char *err)
{
    if (op->m)
        op->m->op = NULL;
    mapping_done_fn done = op->done;
    void *arg = op->arg;
    free(op);
    done(r, m, err, arg);
}

/* A listener bound for a write that may still fail: it accepts nothing until the write is
 * stored (the kernel queues connections meanwhile), and it calls back the mapping it will
 * belong to, not a probe on the stack. */
static void mapping_hold_listener(struct evconnlistener *l, struct mapping *m)
{
    evconnlistener_disable(l);
    evconnlistener_set_cb(l, mapping_accept_cb, m);
}

static void mapping_attach_held(struct mapping *m, struct evconnlistener *l)
{
    mapping_attach_if_enabled(m, l);
    if (m->listener)
        evconnlistener_enable(m->listener);
}

static struct mapping *mapping_find_creating(const struct mapping_registry *reg, int port)
{
    struct mapping *m;
    TAILQ_FOREACH(m, &reg->creating, link)
        if (m->rec.port == port)
            return m;
    return NULL;
}

static void mapping_retried(enum store_result sr, const struct mapping_record *rec, void *arg)
{
    struct mapping_op *op = arg;
    struct mapping *m = op->m;
    char err[192];
    if (sr != STORE_OK) {
        evconnlistener_free(op->l);
        mapping_store_error(sr, m->rec.port, err, sizeof(err));
        mapping_op_end(op, mapping_store_failure(sr), NULL, err);
        return;
    }
    m->rec = *rec;
    mapping_policy_apply(m, true);
    mapping_attach_held(m, op->l);
    m->error[0] = '\0';
    mapping_op_end(op, MAPPING_OK, m, NULL);
}

/* Retry of a mapping kept in status error: on a successful bind the new fields replace it. */
static void mapping_retry_async(struct mapping_registry *reg, struct mapping *old,
                                const struct mapping_record *rec, mapping_done_fn done,
                                void *arg)
{
    char err[192];
    struct mapping probe = *old;
    probe.rec.port = rec->port;
    struct evconnlistener *l = mapping_listen(&probe, err, sizeof(err));
    if (!l) {
        snprintf(old->error, sizeof(old->error), "%s", err);
        done(MAPPING_E_IN_USE, NULL, err, arg);
        return;
    }
    mapping_hold_listener(l, old);
    struct mapping_op *op = mapping_op_new(reg, old, done, arg);
    if (!op) {
        evconnlistener_free(l);
        done(MAPPING_E_STORE, NULL, "out of memory", arg);
        return;
    }
    op->l = l;
    old->op = op;
    store_mapping_replace_async(reg->srv->store, rec, mapping_retried, op);
}

static void mapping_created(enum store_result sr, const struct mapping_record *rec, void *arg)
{
    struct mapping_op *op = arg;
    struct mapping_registry *reg = op->reg;
    struct mapping *m = op->m;
    TAILQ_REMOVE(&reg->creating, m, link);
    if (sr == STORE_DUPLICATE && op->picked) {
        /* Another node stored the port this one picked (their creates crossed): the next
         * free port of the range, as if that one had been taken before. */
        char err[192];
        evconnlistener_free(op->l);
        op->l = NULL;
        if (op->default_target)
            m->rec.target_port = 0;
        struct evconnlistener *l = mapping_listen_any(reg, m, m->rec.port + 1, err,
                                                      sizeof(err));
        if (l) {
            mapping_hold_listener(l, m);
            op->l = l;
            TAILQ_INSERT_TAIL(&reg->creating, m, link);
            store_mapping_insert_async(reg->srv->store, &m->rec, mapping_created, op);
            return;
        }
        enum mapping_result r = mapping_listen_failure(MAPPING_E_EXHAUSTED);
        op->m = NULL;
        m->op = NULL;
        mapping_free(m);
        mapping_op_end(op, r, NULL, err);
        return;
    }
    if (sr != STORE_OK) {
        char err[192];
        mapping_store_error(sr, m->rec.port, err, sizeof(err));
        evconnlistener_free(op->l);
        op->m = NULL;
        m->op = NULL;
        mapping_free(m);
        mapping_op_end(op, sr == STORE_DUPLICATE ? MAPPING_E_IN_USE : mapping_store_failure(sr),
                       NULL, err);
        return;
    }
    m->rec = *rec;
    mapping_attach_held(m, op->l);
    mapping_registry_link(reg, m);
    mapping_op_end(op, MAPPING_OK, m, NULL);
}

void mapping_registry_create_async(struct mapping_registry *reg,
                                   const struct mapping_record *rec, mapping_done_fn done,
                                   void *arg)
{
    char err[192];
    struct mapping *old = rec->port ? mapping_registry_find(reg, rec->port) : NULL;
    if ((old && (old->op || old->listener || !old->rec.enabled)) ||
        (rec->port && mapping_find_creating(reg, rec->port))) {
        snprintf(err, sizeof(err), "port %d is already mapped", rec->port);
        done(MAPPING_E_IN_USE, NULL, err, arg);
        return;
    }
    if (old && reg->srv->cfg->db_url[0]) {
        /* In a cluster the stored mapping is every node's: that this node could not bind
         * it does not make the port free, and a replace would change it everywhere. */
        snprintf(err, sizeof(err), "port %d is already mapped (this node could not bind "
                                   "it: %.100s)", rec->port, old->error);
        done(MAPPING_E_IN_USE, NULL, err, arg);
        return;
    }
    if (old) {
        mapping_retry_async(reg, old, rec, done, arg);
        return;
    }
    struct mapping *m = mapping_new(reg->srv, rec);
    if (!m) {
        done(MAPPING_E_STORE, NULL, "out of memory", arg);
        return;
    }
    struct evconnlistener *l = rec->port ? mapping_listen(m, err, sizeof(err))
                                         : mapping_listen_any(reg, m, 0, err, sizeof(err));
    if (!l) {
        enum mapping_result r =
            mapping_listen_failure(rec->port ? MAPPING_E_IN_USE : MAPPING_E_EXHAUSTED);
        mapping_free(m);
        done(r, NULL, err, arg);
        return;
    }
    mapping_hold_listener(l, m);
    struct mapping_op *op = mapping_op_new(reg, m, done, arg);
    if (!op) {
        evconnlistener_free(l);
        mapping_free(m);
        done(MAPPING_E_STORE, NULL, "out of memory", arg);
        return;
    }
    /* Listed as being created: the port is taken for creates and the port-0 search, but
     * the mapping is neither listed nor found until it is stored. */
    op->l = l;
    op->picked = rec->port == 0;
    op->default_target = rec->target_port == 0;
    m->op = op;
    TAILQ_INSERT_TAIL(&reg->creating, m, link);
    store_mapping_insert_async(reg->srv->store, &m->rec, mapping_created, op);
}

/* An enabled mapping without a listener (enabled by another node, or in status error):
 * binds it now, or keeps the error. */
static void mapping_listen_if_enabled(struct mapping *m)
{
    if (!m->rec.enabled || m->listener)
        return;
    struct evconnlistener *l = mapping_listen(m, m->error, sizeof(m->error));
    if (l) {
        mapping_attach_listener(m, l);
        m->error[0] = '\0';
    } else {
        log_error("mapping", "port %d kept with status error: %s", m->rec.port, m->error);
    }
}

static void mapping_updated(enum store_result sr, const struct mapping_record *rec, void *arg)
{
    struct mapping_op *op = arg;
    struct mapping *m = op->m;
    if (sr != STORE_OK) {
        char err[192];
        if (op->l)
            evconnlistener_free(op->l);
        mapping_store_error(sr, m->rec.port, err, sizeof(err));
        mapping_op_end(op, mapping_store_failure(sr), NULL, err);
        return;
    }
    /* rec is the row as stored: in a cluster, another node's change to the parts this
     * update left alone may be in it, a disable included. */
    m->rec = *rec;
    if (!m->rec.enabled) {
        mapping_detach_listener(m);
        mapping_abort_conns(m);
    }
    if (op->l) {
        mapping_attach_held(m, op->l); /* frees it when the row is disabled after all */
        if (m->listener)
            m->error[0] = '\0';
    } else {
        mapping_listen_if_enabled(m);
    }
    mapping_policy_apply(m, true);
    mapping_op_end(op, MAPPING_OK, m, NULL);
}

void mapping_registry_update_async(struct mapping_registry *reg,
                                   const struct mapping_record *rec, unsigned named,
                                   mapping_done_fn done, void *arg)
{
    char err[192];
    struct mapping_op *op = mapping_op_for_port(reg, rec->port, done, arg);
    if (!op)
        return;
    struct mapping *m = op->m;
    op->next = *rec;
    op->next.id = m->rec.id;
    op->next.created_at = m->rec.created_at;
    /* Enabling: bind before storing, so a port taken meanwhile changes nothing. A mapping
     * in status error that stays enabled is stored either way and keeps its error. */
    if (op->next.enabled && !m->listener) {
        op->l = mapping_listen(m, err, sizeof(err));
        if (!op->l && !m->rec.enabled) {
            enum mapping_result r = mapping_listen_failure(MAPPING_E_IN_USE);
            free(op);
            done(r, NULL, err, arg);
            return;
        }
        if (!op->l)
            snprintf(m->error, sizeof(m->error), "%s", err);
        else
            mapping_hold_listener(op->l, m);
    }
    m->op = op;
    store_mapping_update_async(reg->srv->store, &m->rec, &op->next, named, mapping_updated,
                               op);
}

static void mapping_removed(enum store_result sr, const struct mapping_record *rec, void *arg)
{
    struct mapping_op *op = arg;
    struct mapping *m = op->m;
    if (sr != STORE_OK && sr != STORE_NOT_FOUND) {
        char err[192];
        mapping_store_error(sr, m->rec.port, err, sizeof(err));
        mapping_op_end(op, mapping_store_failure(sr), NULL, err);
        return;
    }
    struct mapping_registry *reg = op->reg;
    mapping_registry_unlink(reg, m);
    op->m = NULL;
    m->op = NULL;
    mapping_free(m);
    mapping_op_end(op, MAPPING_OK, NULL, NULL);
}

void mapping_registry_remove_async(struct mapping_registry *reg, int port,
                                   mapping_done_fn done, void *arg)
{
    struct mapping_op *op = mapping_op_for_port(reg, port, done, arg);
    if (!op)
        return;
    op->m->op = op;
    store_mapping_delete_async(reg->srv->store, port, mapping_removed, op);
}

/* ---- failed dials ----
 * Every public connection can fail its dial, so an unlimited line per failure would let
 * anyone who can connect fill the log; one line per mapping per 10 s with the count left
 * out keeps the reason visible at the default level and the log bounded. */

void mapping_dial_failed(struct mapping *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->dial.last_error, sizeof(m->dial.last_error), fmt, ap);
    va_end(ap);
    time_t now = time(NULL);
    m->dial.last_error_at = now;
    unsigned long held;
    if (!log_limit_take(&m->dial.log, now, MAPPING_DIAL_LOG_SECONDS, &held))
        return;
    if (held)
        log_info("mapping", "port %d: dial failed: %s (%lu more failed since the last line)",
                 m->rec.port, m->dial.last_error, held);
    else
        log_info("mapping", "port %d: dial failed: %s", m->rec.port, m->dial.last_error);
}

/* ---- changes made by another node (SPEC §7) ----
 * The row is in the database already; these only bring the live registry in line with
 * it, and never write to the store. */

static bool mapping_record_same(const struct mapping_record *a, const struct mapping_record *b)
{
    return a->id == b->id && a->port == b->port && a->target_port == b->target_port &&
           a->use_tunnel == b->use_tunnel && a->created_at == b->created_at &&
           a->proxy_protocol == b->proxy_protocol && a->max_connections == b->max_connections &&
           a->rate_limit == b->rate_limit && a->enabled == b->enabled &&
           strcmp(a->target_ip, b->target_ip) == 0 && strcmp(a->client, b->client) == 0 &&
           strcmp(a->name, b->name) == 0 && strcmp(a->allow_from, b->allow_from) == 0;
}

bool mapping_registry_writing(struct mapping_registry *reg, int port)
{
    const struct mapping *m = mapping_registry_find(reg, port);
    return mapping_find_creating(reg, port) || (m && m->op);
}

bool mapping_registry_apply(struct mapping_registry *reg, const struct mapping_record *rec)
{
    /* A write of ours is in flight for that port: its answer decides, and the read after
     * it brings the rest in line. */
    if (mapping_registry_writing(reg, rec->port))
        return false;
    struct mapping *m = mapping_registry_find(reg, rec->port);
    if (!m) {
        mapping_restore_one(rec, reg);
        return true;
    }
    if (mapping_record_same(&m->rec, rec))
        return false;
    if (m->rec.id && rec->id && m->rec.id != rec->id) {
        /* Removed and created anew while this node was not reading (its change feed down,
         * or both in one transaction): a new mapping, not a change of the old one. Its
         * connections end as a remove ends them, whatever the new row says. */
        mapping_registry_unlink(reg, m);
        mapping_free(m);
        log_info("mapping", "port %d removed and created anew by another node", rec->port);
        mapping_restore_one(rec, reg);
        return true;
    }
    bool was_enabled = m->rec.enabled;
    m->rec = *rec;
    if (!rec->enabled && was_enabled) {
        mapping_detach_listener(m);
        mapping_abort_conns(m);
    }
    mapping_listen_if_enabled(m);
    mapping_policy_apply(m, true);
    log_info("mapping", "port %d changed by another node", rec->port);
    return true;
}

bool mapping_registry_forget(struct mapping_registry *reg, int port)
{
    struct mapping *m = mapping_registry_find(reg, port);
    if (!m || m->op) /* a write in flight: as in mapping_registry_apply */
        return false;
    mapping_registry_unlink(reg, m);
    mapping_free(m);
    log_info("mapping", "port %d removed by another node", port);
    return true;
}

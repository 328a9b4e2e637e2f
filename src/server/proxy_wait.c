#include "proxy_wait.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <time.h>

#include <event2/event.h>

#include "config.h"
#include "log.h"
#include "log_limit.h"
#include "netaddr.h"
#include "proxy_header.h"

#define PW_MOD "proxy"
/* A balancer that sends no header: one line per listener per 10 s. */
#define PW_LOG_SECONDS 10
#define PW_STR(x) #x
#define PW_XSTR(x) PW_STR(x)
#define PW_SECONDS_TEXT PW_XSTR(PROXY_WAIT_SECONDS)

struct proxy_wait {
    struct proxy_waits *pw;
    evutil_socket_t fd;
    struct event *ev;
    struct sockaddr_storage peer;
    socklen_t peerlen;
    int64_t deadline_ms;              /* CLOCK_MONOTONIC */
    unsigned char buf[PROXY_HEADER_PEEK]; /* the header's bytes read so far */
    size_t have;
    size_t skip;                      /* v2 TLV bytes still to discard */
    bool parsed;                      /* info holds the header's addresses */
    struct proxy_header_info info;    /* once parsed */
    TAILQ_ENTRY(proxy_wait) link;
};

struct proxy_waits {
    struct event_base *base;
    char what[40];
    proxy_waits_done_fn done;
    void *arg;
    uint64_t *refused;
    TAILQ_HEAD(, proxy_wait) waiting;
    size_t count;
    struct log_limit log;
};

bool proxy_waits_trusted(const struct config *cfg, const struct sockaddr *sa)
{
    for (size_t i = 0; i < cfg->trusted_proxies_len; i++)
        if (netaddr_cidr_match(&cfg->trusted_proxies[i], sa))
            return true;
    return false;
}

struct proxy_waits *proxy_waits_new(struct event_base *base, const char *what,
                                    proxy_waits_done_fn done, void *arg, uint64_t *refused)
{
    struct proxy_waits *pw = calloc(1, sizeof(*pw));
    if (!pw)
        return NULL;
    pw->base = base;
    snprintf(pw->what, sizeof(pw->what), "%s", what);
    pw->done = done;
    pw->arg = arg;
    pw->refused = refused;
    TAILQ_INIT(&pw->waiting);
    return pw;
}

static void proxy_wait_free(struct proxy_wait *w, bool close_fd)
{
    struct proxy_waits *pw = w->pw;
    TAILQ_REMOVE(&pw->waiting, w, link);
    pw->count--;
    event_free(w->ev);
    if (close_fd)
        evutil_closesocket(w->fd);
    free(w);
}

void proxy_waits_free(struct proxy_waits *pw)
{
    if (!pw)
        return;
    struct proxy_wait *w;
    while ((w = TAILQ_FIRST(&pw->waiting)) != NULL)
        proxy_wait_free(w, true);
    free(pw);
}

size_t proxy_waits_count(const struct proxy_waits *pw)
{
    return pw ? pw->count : 0;
}

/* Closed without a usable header: counted, and logged within the limit (the balancer is
 * trusted, but what it relays is not, and a broken one could be asked to misbehave). */
static void proxy_wait_refuse(struct proxy_wait *w, const char *why)
{
    struct proxy_waits *pw = w->pw;
    if (pw->refused)
        (*pw->refused)++;
    unsigned long held;
    if (log_limit_take(&pw->log, time(NULL), PW_LOG_SECONDS, &held)) {
        char who[64];
        log_warn(PW_MOD, "%s: connection from balancer %s closed: %s (it is in "
                         "trusted_proxies, so it must send a PROXY protocol v1 or v2 header "
                         "first; %lu more such closes not logged)",
                 pw->what, netaddr_format((const struct sockaddr *)&w->peer, who, sizeof(who)),
                 why, held);
    }
    proxy_wait_free(w, true);
}

static void proxy_wait_finish(struct proxy_wait *w)
{
    struct proxy_waits *pw = w->pw;
    evutil_socket_t fd = w->fd;
    struct sockaddr_storage src;
    socklen_t srclen;
    if (w->info.src.ss_family == AF_INET || w->info.src.ss_family == AF_INET6) {
        src = w->info.src;
        srclen = w->info.src.ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                                  : sizeof(struct sockaddr_in6);
    } else {
        src = w->peer;
        srclen = w->peerlen;
    }
    proxy_wait_free(w, false);
    pw->done(fd, (const struct sockaddr *)&src, srclen, pw->arg);
}

/* Reads what belongs to the header and not a byte more: what follows is the client's and
 * goes to the listener's own reader. Returns 1 when the header is in, 0 to wait for more,
 * -1 after refusing (w freed). */
static int proxy_wait_read(struct proxy_wait *w)
{
    for (;;) {
        if (w->parsed && w->skip == 0)
            return 1;
        if (w->skip > 0) {
            unsigned char scratch[512];
            size_t want = w->skip < sizeof(scratch) ? w->skip : sizeof(scratch);
            ssize_t n = recv(w->fd, scratch, want, 0);
            if (n > 0) {
                w->skip -= (size_t)n;
                continue;
            }
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                return 0;
            proxy_wait_refuse(w, n == 0 ? "closed inside its PROXY header" : strerror(errno));
            return -1;
        }
        /* Look first: the header's end is known only once its bytes are seen. */
        ssize_t n = recv(w->fd, w->buf + w->have, sizeof(w->buf) - w->have, MSG_PEEK);
        if (w->have == 0 && (n == 0 || (n < 0 && errno == ECONNRESET))) {
            /* Connected and closed (or reset) without a byte: the balancer's health check
             * (haproxy's "check" sends no header). Nothing to refuse or log. */
            log_debug(PW_MOD, "%s: a balancer's connection closed before sending anything",
                      w->pw->what);
            proxy_wait_free(w, true);
            return -1;
        }
        if (n == 0) {
            proxy_wait_refuse(w, "closed inside its PROXY header");
            return -1;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                return 0;
            proxy_wait_refuse(w, strerror(errno));
            return -1;
        }
        size_t seen = w->have + (size_t)n;
        long total = proxy_header_parse(w->buf, seen, &w->info);
        if (total < 0) {
            proxy_wait_refuse(w, "no valid PROXY protocol header");
            return -1;
        }
        /* Take the header's bytes among those seen: all of them while it is incomplete. */
        size_t take = total == 0 ? (size_t)n
                                 : ((size_t)total < seen ? (size_t)total : seen) - w->have;
        ssize_t got = recv(w->fd, w->buf + w->have, take, 0);
        if (got != (ssize_t)take) {
            proxy_wait_refuse(w, "the connection failed while its header was read");
            return -1;
        }
        w->have += take;
        if (total == 0)
            return 0;
        w->parsed = true;
        w->skip = (size_t)total - w->have;
        /* Loop: done, or discard the TLVs that are already here. */
    }
}

static void proxy_wait_event_cb(evutil_socket_t fd, short what, void *arg);

static int64_t proxy_wait_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for more bytes until the deadline; 0, or -1 after refusing (w freed). */
static int proxy_wait_arm(struct proxy_wait *w)
{
    int64_t left_ms = w->deadline_ms - proxy_wait_now_ms();
    if (left_ms <= 0) {
        proxy_wait_refuse(w, "no PROXY header within " PW_SECONDS_TEXT " s");
        return -1;
    }
    struct timeval left = {(time_t)(left_ms / 1000), (suseconds_t)(left_ms % 1000 * 1000)};
    if (event_add(w->ev, &left) != 0) {
        proxy_wait_refuse(w, "out of memory");
        return -1;
    }
    return 0;
}

/* One pass: the bytes that came, or the deadline. */
static void proxy_wait_step(struct proxy_wait *w)
{
    int r = proxy_wait_read(w);
    if (r == 1)
        proxy_wait_finish(w);
    else if (r == 0)
        proxy_wait_arm(w);
}

static void proxy_wait_event_cb(evutil_socket_t fd, short what, void *arg)
{
    struct proxy_wait *w = arg;
    if (what & EV_TIMEOUT) {
        proxy_wait_refuse(w, "no PROXY header within " PW_SECONDS_TEXT " s");
        return;
    }
    proxy_wait_step(w);
}

int proxy_waits_add(struct proxy_waits *pw, evutil_socket_t fd, const struct sockaddr *peer,
                    socklen_t peerlen, size_t max)
{
    if (pw->count >= max) {
        if (pw->refused)
            (*pw->refused)++;
        unsigned long held;
        if (log_limit_take(&pw->log, time(NULL), PW_LOG_SECONDS, &held))
            log_warn(PW_MOD, "%s: connection from a balancer closed at accept: %zu already "
                             "wait for their PROXY header (%lu more such closes not logged)",
                     pw->what, pw->count, held);
        evutil_closesocket(fd);
        return -1;
    }
    struct proxy_wait *w = calloc(1, sizeof(*w));
    if (!w) {
        evutil_closesocket(fd);
        return -1;
    }
    w->pw = pw;
    w->fd = fd;
    if (peerlen > (socklen_t)sizeof(w->peer))
        peerlen = sizeof(w->peer);
    memcpy(&w->peer, peer, peerlen);
    w->peerlen = peerlen;
    w->ev = event_new(pw->base, fd, EV_READ, proxy_wait_event_cb, w);
    if (!w->ev) {
        free(w);
        evutil_closesocket(fd);
        return -1;
    }
    w->deadline_ms = proxy_wait_now_ms() + PROXY_WAIT_SECONDS * 1000;
    TAILQ_INSERT_TAIL(&pw->waiting, w, link);
    pw->count++;
    /* The header usually came with the handshake's last segment: read it now. */
    proxy_wait_step(w);
    return 0;
}

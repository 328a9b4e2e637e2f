/* Forwarding-loop detection: this host's addresses and this server's ports. */
#include "loop_guard.h"

#include <ifaddrs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/util.h>

#include "config.h"
#include "mapping.h"
#include "netaddr.h"
#include "server.h"
#include "tunnel_server.h"

/* Interface addresses are re-read at most this often on the dial path (create re-reads
 * them every time): an address added to the host is seen within seconds. */
#define LOOP_GUARD_IFADDR_TTL 5
/* More addresses than any real host has; beyond it the rest are not seen (logged). */
#define LOOP_GUARD_MAX_IFADDRS 256

/* The loop is single-threaded, so one cache per process needs no lock. */
static uint8_t if_keys[LOOP_GUARD_MAX_IFADDRS][16];
static size_t if_count;
static time_t if_read_at;
static bool if_read_once;

static void loop_guard_read_ifaddrs(void)
{
    struct ifaddrs *list = NULL;
    if (getifaddrs(&list) != 0)
        return; /* keep what we had: loopback and unspecified are caught regardless */
    size_t n = 0;
    for (struct ifaddrs *ifa = list; ifa && n < LOOP_GUARD_MAX_IFADDRS; ifa = ifa->ifa_next) {
        if (ifa->ifa_addr && netaddr_key(ifa->ifa_addr, if_keys[n]) == 0)
            n++;
    }
    freeifaddrs(list);
    if_count = n;
    if_read_at = time(NULL);
    if_read_once = true;
}

static bool loop_guard_is_if_addr(const struct sockaddr *sa, bool fresh)
{
    uint8_t k[16];
    if (netaddr_key(sa, k) != 0)
        return false;
    time_t now = time(NULL);
    if (fresh || !if_read_once || now - if_read_at >= LOOP_GUARD_IFADDR_TTL || now < if_read_at)
        loop_guard_read_ifaddrs();
    for (size_t i = 0; i < if_count; i++) {
        if (memcmp(if_keys[i], k, 16) == 0)
            return true;
    }
    return false;
}

bool loop_guard_is_local_addr(const struct sockaddr *sa)
{
    return netaddr_is_self_by_definition(sa) || loop_guard_is_if_addr(sa, false);
}

bool loop_guard_is_self_name(const char *name)
{
    char host[256];
    if (netaddr_is_localhost_name(name))
        return true;
    if (gethostname(host, sizeof(host)) != 0)
        return false;
    host[sizeof(host) - 1] = '\0';
    size_t n = strlen(name);
    if (n > 0 && name[n - 1] == '.')
        n--;
    return n > 0 && strlen(host) == n && strncasecmp(name, host, n) == 0;
}

bool loop_guard_is_server_port(struct server *srv, int port, int extra_port)
{
    if (port <= 0)
        return false;
    if (port == extra_port)
        return true;
    if (port == (srv->api_port ? srv->api_port : srv->cfg->api_listen_port))
        return true;
    if (srv->tunnel && port == tunnel_server_port(srv->tunnel))
        return true;
    return srv->mappings && mapping_registry_find(srv->mappings, port) != NULL;
}

static int sockaddr_port(const struct sockaddr *sa)
{
    uint8_t k[16];
    if (netaddr_key(sa, k) != 0)
        return 0;
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    return ntohs(sa->sa_family == AF_INET ? in->sin_port : in6->sin6_port);
}

bool loop_guard_targets_self(struct server *srv, const struct sockaddr *sa, int extra_port)
{
    /* The port first: it is the cheap test, and most targets fail it. */
    return loop_guard_is_server_port(srv, sockaddr_port(sa), extra_port) &&
           loop_guard_is_local_addr(sa);
}

/* An answer that evdns could give at once (numeric, /etc/hosts) or not at all yet. */
struct loop_guard_lookup {
    bool answered;
    bool abandoned;     /* the caller went on without it: the callback frees this */
    bool self;          /* one of the addresses is this host */
};

static void loop_guard_lookup_cb(int err, struct evutil_addrinfo *res, void *arg)
{
    struct loop_guard_lookup *lk = arg;
    if (lk->abandoned) {
        if (res)
            evutil_freeaddrinfo(res);
        free(lk);
        return;
    }
    lk->answered = true;
    for (struct evutil_addrinfo *ai = err == 0 ? res : NULL; ai; ai = ai->ai_next) {
        if (loop_guard_is_local_addr(ai->ai_addr))
            lk->self = true;
    }
    if (res)
        evutil_freeaddrinfo(res);
}

/* Whether name resolves, from what is known without a DNS query, to this host. */
static bool loop_guard_name_is_self(struct server *srv, const char *name)
{
    if (loop_guard_is_self_name(name))
        return true;
    struct loop_guard_lookup *lk = calloc(1, sizeof(*lk));
    if (!lk || !srv->dns) {
        free(lk);
        return false;
    }
    struct evutil_addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    struct evdns_getaddrinfo_request *req =
        evdns_getaddrinfo(srv->dns, name, NULL, &hints, loop_guard_lookup_cb, lk);
    if (req) {
        /* It needs a DNS query: the API does not wait for one; the dial checks again. */
        lk->abandoned = true;
        evdns_getaddrinfo_cancel(req);
        return false;
    }
    bool self = lk->answered && lk->self;
    free(lk);
    return self;
}

int loop_guard_check_create(struct server *srv, const struct mapping_record *rec, char *msg,
                            size_t msglen)
{
    if (rec->use_tunnel || !rec->target_ip[0])
        return 0;
    /* Port and target_port both omitted: the target is the port the server will pick,
     * the mapping's own listener, whichever it is. */
    bool own_port = rec->port == 0 && rec->target_port == 0;
    if (!own_port && !loop_guard_is_server_port(srv, rec->target_port, rec->port))
        return 0;
    struct sockaddr_storage ss;
    socklen_t len;
    bool self;
    if (netaddr_ip_sockaddr(rec->target_ip, (uint16_t)rec->target_port, &ss, &len) == 0)
        self = netaddr_is_self_by_definition((struct sockaddr *)&ss) ||
               loop_guard_is_if_addr((struct sockaddr *)&ss, true);
    else
        self = loop_guard_name_is_self(srv, rec->target_ip);
    if (!self)
        return 0;
    if (own_port) {
        snprintf(msg, msglen, "target_port is required when port is omitted and target_ip "
                              "%.64s is this host (a forwarding loop)", rec->target_ip);
        return -1;
    }
    snprintf(msg, msglen,
             "target_ip %.64s:%d is this server itself (port %d is one it listens on): "
             "a forwarding loop",
             rec->target_ip, rec->target_port, rec->target_port);
    return -1;
}

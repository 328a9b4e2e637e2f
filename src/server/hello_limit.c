/* Per-source failure counting and log rate limiting for the tunnel's Hello path.
 * Entries live in one array; a small chained hash (indices, no pointers) finds them. */
#include "hello_limit.h"

#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#define HL_NONE UINT32_MAX

struct hl_key {
    uint8_t family;             /* AF_INET or AF_INET6 */
    uint8_t addr[16];
};

struct hl_entry {
    struct hl_key key;
    uint32_t next;              /* hash chain */
    int64_t last_active_ms;
    int64_t blocked_until_ms;
    /* The times of the last HELLO_LIMIT_FAILURES failures, a ring. */
    int64_t fail_ms[HELLO_LIMIT_FAILURES];
    unsigned nfail, fail_pos;
    int64_t log_ms[HELLO_LOG_KINDS];     /* when a line of this kind was last logged */
    bool logged[HELLO_LOG_KINDS];
    uint64_t suppressed[HELLO_LOG_KINDS];
};

struct hello_limit {
    struct hl_entry *v;
    size_t len, cap;
    uint32_t *buckets;
    size_t nbuckets;            /* a power of two */
    int64_t global_log_ms[HELLO_LOG_KINDS];
    unsigned global_logged[HELLO_LOG_KINDS];
};

static void hl_key_of(const struct sockaddr *sa, struct hl_key *k)
{
    memset(k, 0, sizeof(*k));
    if (sa->sa_family == AF_INET) {
        k->family = AF_INET;
        memcpy(k->addr, &((const struct sockaddr_in *)sa)->sin_addr, 4);
        return;
    }
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        /* ::ffff:a.b.c.d is the same peer as a.b.c.d on a dual-stack listener. */
        if (IN6_IS_ADDR_V4MAPPED(a)) {
            k->family = AF_INET;
            memcpy(k->addr, a->s6_addr + 12, 4);
        } else {
            k->family = AF_INET6;
            memcpy(k->addr, a->s6_addr, 8); /* the /64 */
        }
    }
}

static size_t hl_hash(const struct hl_key *k, size_t n)
{
    /* FNV-1a: the table is small and bounded, so an adversary aiming at one bucket only
     * lengthens one chain of at most max_sources entries. */
    uint32_t h = 2166136261u;
    const uint8_t *p = (const uint8_t *)k;
    for (size_t i = 0; i < sizeof(*k); i++)
        h = (h ^ p[i]) * 16777619u;
    return h & (n - 1);
}

struct hello_limit *hello_limit_new(size_t max_sources)
{
    if (max_sources == 0)
        max_sources = HELLO_LIMIT_DEFAULT_SOURCES;
    struct hello_limit *hl = calloc(1, sizeof(*hl));
    if (!hl)
        return NULL;
    hl->cap = max_sources;
    hl->nbuckets = 16;
    while (hl->nbuckets < max_sources)
        hl->nbuckets *= 2;
    hl->v = calloc(hl->cap, sizeof(*hl->v));
    hl->buckets = malloc(hl->nbuckets * sizeof(*hl->buckets));
    if (!hl->v || !hl->buckets) {
        hello_limit_free(hl);
        return NULL;
    }
    for (size_t i = 0; i < hl->nbuckets; i++)
        hl->buckets[i] = HL_NONE;
    return hl;
}

void hello_limit_free(struct hello_limit *hl)
{
    if (!hl)
        return;
    free(hl->v);
    free(hl->buckets);
    free(hl);
}

size_t hello_limit_sources(const struct hello_limit *hl) { return hl->len; }

static uint32_t *hl_slot(struct hello_limit *hl, const struct hl_key *k)
{
    uint32_t *p = &hl->buckets[hl_hash(k, hl->nbuckets)];
    while (*p != HL_NONE && memcmp(&hl->v[*p].key, k, sizeof(*k)) != 0)
        p = &hl->v[*p].next;
    return p;
}

/* Unlinks entry i and moves the last entry into its place. */
static void hl_remove(struct hello_limit *hl, uint32_t i)
{
    uint32_t *p = hl_slot(hl, &hl->v[i].key);
    *p = hl->v[i].next;
    uint32_t last = (uint32_t)hl->len - 1;
    if (i != last) {
        uint32_t *q = hl_slot(hl, &hl->v[last].key);
        hl->v[i] = hl->v[last];
        *q = i;
    }
    hl->len--;
}

/* The entry for sa, created when missing (evicting the least recently active one when
 * the table is full). */
static struct hl_entry *hl_get(struct hello_limit *hl, const struct sockaddr *sa,
                               int64_t now_ms)
{
    struct hl_key k;
    hl_key_of(sa, &k);
    uint32_t *p = hl_slot(hl, &k);
    if (*p != HL_NONE) {
        hl->v[*p].last_active_ms = now_ms;
        return &hl->v[*p];
    }
    if (hl->len == hl->cap) {
        /* The least recently active source that is not blocked; only when every one is,
         * the block that ends first. */
        uint32_t oldest = HL_NONE, ends_first = 0;
        for (uint32_t i = 0; i < hl->len; i++) {
            const struct hl_entry *e = &hl->v[i];
            if (now_ms >= e->blocked_until_ms) {
                if (oldest == HL_NONE || e->last_active_ms < hl->v[oldest].last_active_ms)
                    oldest = i;
            } else if (e->blocked_until_ms < hl->v[ends_first].blocked_until_ms) {
                ends_first = i;
            }
        }
        hl_remove(hl, oldest != HL_NONE ? oldest : ends_first);
        p = hl_slot(hl, &k); /* the chain may have changed */
    }
    uint32_t i = (uint32_t)hl->len++;
    struct hl_entry *e = &hl->v[i];
    memset(e, 0, sizeof(*e));
    e->key = k;
    e->next = HL_NONE;
    e->last_active_ms = now_ms;
    *p = i;
    return e;
}

static struct hl_entry *hl_lookup(struct hello_limit *hl, const struct sockaddr *sa)
{
    struct hl_key k;
    hl_key_of(sa, &k);
    uint32_t *p = hl_slot(hl, &k);
    return *p == HL_NONE ? NULL : &hl->v[*p];
}

bool hello_limit_blocked(struct hello_limit *hl, const struct sockaddr *sa, int64_t now_ms)
{
    struct hl_entry *e = hl_lookup(hl, sa);
    return e && now_ms < e->blocked_until_ms;
}

bool hello_limit_failure(struct hello_limit *hl, const struct sockaddr *sa, int64_t now_ms)
{
    struct hl_entry *e = hl_get(hl, sa, now_ms);
    e->fail_ms[e->fail_pos] = now_ms;
    e->fail_pos = (e->fail_pos + 1) % HELLO_LIMIT_FAILURES;
    if (e->nfail < HELLO_LIMIT_FAILURES)
        e->nfail++;
    if (now_ms < e->blocked_until_ms || e->nfail < HELLO_LIMIT_FAILURES)
        return false;
    /* fail_pos now points at the oldest of the last HELLO_LIMIT_FAILURES failures. */
    if (now_ms - e->fail_ms[e->fail_pos] > HELLO_LIMIT_WINDOW_MS)
        return false;
    e->blocked_until_ms = now_ms + HELLO_LIMIT_BLOCK_MS;
    e->nfail = 0; /* after the block, ten more failures are needed for the next one */
    return true;
}

bool hello_limit_log(struct hello_limit *hl, const struct sockaddr *sa,
                     enum hello_log_kind kind, int64_t now_ms, uint64_t *suppressed)
{
    *suppressed = 0;
    if ((unsigned)kind >= HELLO_LOG_KINDS)
        return false;
    struct hl_entry *e = hl_get(hl, sa, now_ms);
    if (e->logged[kind] && now_ms - e->log_ms[kind] < HELLO_LIMIT_LOG_MS) {
        e->suppressed[kind]++;
        return false;
    }
    if (now_ms - hl->global_log_ms[kind] >= HELLO_LIMIT_LOG_MS) {
        hl->global_log_ms[kind] = now_ms;
        hl->global_logged[kind] = 0;
    }
    if (hl->global_logged[kind] >= HELLO_LIMIT_LOG_GLOBAL) {
        e->suppressed[kind]++;
        return false;
    }
    hl->global_logged[kind]++;
    e->logged[kind] = true;
    e->log_ms[kind] = now_ms;
    *suppressed = e->suppressed[kind];
    e->suppressed[kind] = 0;
    return true;
}

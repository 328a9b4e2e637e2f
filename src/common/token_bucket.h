/* A token bucket for byte rates: `rate` bytes per second, holding at most a quarter
 * second's worth, so a limited mapping starts with a small burst and then stays at its
 * rate. Pure (the caller passes the time), so it is unit-tested without sleeping. */
#ifndef PORTMUX_TOKEN_BUCKET_H
#define PORTMUX_TOKEN_BUCKET_H

#include <stdint.h>

struct token_bucket {
    uint64_t rate;      /* bytes per second; 0 = unlimited */
    uint64_t capacity;  /* most tokens held */
    uint64_t tokens;
    uint64_t last_ns;   /* when tokens were last refilled */
};

/* (Re)sets the rate, keeping the tokens held (capped by the new capacity). */
void token_bucket_set_rate(struct token_bucket *tb, uint64_t rate, uint64_t now_ns);

/* How many of `want` bytes may go now (all of them when unlimited). */
uint64_t token_bucket_available(struct token_bucket *tb, uint64_t want, uint64_t now_ns);

/* Takes n bytes' tokens (n at most what available returned). */
void token_bucket_take(struct token_bucket *tb, uint64_t n);

/* Nanoseconds until `want` tokens (capped by the capacity) are there; 0 when they are. */
uint64_t token_bucket_wait_ns(const struct token_bucket *tb, uint64_t want);

#endif

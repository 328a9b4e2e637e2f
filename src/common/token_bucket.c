#include "token_bucket.h"

#define TB_NS 1000000000ull

/* 128-bit products: rate (up to 10^12) times nanoseconds overflows 64 bits. */
typedef unsigned __int128 tb_u128;

static void token_bucket_refill(struct token_bucket *tb, uint64_t now_ns)
{
    if (now_ns <= tb->last_ns)
        return;
    uint64_t dt = now_ns - tb->last_ns;
    tb_u128 add = (tb_u128)dt * tb->rate / TB_NS;
    uint64_t room = tb->capacity - tb->tokens;
    if (add > room) {
        /* Full before now: the time since is not owed to anyone. */
        tb->tokens = tb->capacity;
        tb->last_ns = now_ns;
        return;
    }
    /* Advance the clock only by the time the whole tokens took, so the fraction of a
     * token earned so far is not lost (slow rates would fall behind otherwise). */
    tb->tokens += (uint64_t)add;
    tb->last_ns += (uint64_t)(add * TB_NS / tb->rate);
}

void token_bucket_set_rate(struct token_bucket *tb, uint64_t rate, uint64_t now_ns)
{
    if (tb->rate)
        token_bucket_refill(tb, now_ns);
    else
        tb->tokens = rate / 4 ? rate / 4 : 1; /* a new limit starts with its burst */
    tb->rate = rate;
    tb->capacity = rate / 4 ? rate / 4 : 1;
    if (tb->tokens > tb->capacity)
        tb->tokens = tb->capacity;
    tb->last_ns = now_ns;
}

uint64_t token_bucket_available(struct token_bucket *tb, uint64_t want, uint64_t now_ns)
{
    if (!tb->rate)
        return want;
    token_bucket_refill(tb, now_ns);
    return want < tb->tokens ? want : tb->tokens;
}

void token_bucket_take(struct token_bucket *tb, uint64_t n)
{
    if (tb->rate)
        tb->tokens = n < tb->tokens ? tb->tokens - n : 0;
}

uint64_t token_bucket_wait_ns(const struct token_bucket *tb, uint64_t want)
{
    if (!tb->rate)
        return 0;
    if (want > tb->capacity)
        want = tb->capacity;
    if (tb->tokens >= want)
        return 0;
    uint64_t need = want - tb->tokens;
    return (uint64_t)((tb_u128)need * TB_NS / tb->rate) + 1;
}

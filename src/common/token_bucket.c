#include "token_bucket.h"

#define TB_NS 1000000000ull

static void token_bucket_refill(struct token_bucket *tb, uint64_t now_ns)
{
    if (now_ns <= tb->last_ns)
        return;
    uint64_t dt = now_ns - tb->last_ns;
    /* Whole seconds and the rest apart, so rate * dt cannot overflow 64 bits. */
    uint64_t add = (dt / TB_NS) * tb->rate + (dt % TB_NS) * tb->rate / TB_NS;
    if (add == 0)
        return; /* keep last_ns, or slow rates would never earn a token */
    tb->tokens = tb->capacity - tb->tokens < add ? tb->capacity : tb->tokens + add;
    tb->last_ns = now_ns;
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
    return need / tb->rate * TB_NS + (need % tb->rate) * TB_NS / tb->rate + 1;
}

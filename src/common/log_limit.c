#include "log_limit.h"

bool log_limit_take_burst(struct log_limit *l, time_t now, int period, unsigned burst,
                          unsigned long *held)
{
    if (l->written && now >= l->at && now - l->at < period) {
        if (l->in_window >= burst) {
            l->held++;
            return false;
        }
        l->in_window++;
        *held = 0;
        return true;
    }
    *held = l->held;
    l->held = 0;
    l->at = now;
    l->written = true;
    l->in_window = 1;
    return true;
}

bool log_limit_take(struct log_limit *l, time_t now, int period, unsigned long *held)
{
    return log_limit_take_burst(l, now, period, 1, held);
}

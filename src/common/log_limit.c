#include "log_limit.h"

bool log_limit_take(struct log_limit *l, time_t now, int period, unsigned long *held)
{
    if (l->written && now >= l->at && now - l->at < period) {
        l->held++;
        return false;
    }
    *held = l->held;
    l->held = 0;
    l->at = now;
    l->written = true;
    return true;
}

/* See fd_limit.h. */
#include "fd_limit.h"

#include <sys/resource.h>
#include <time.h>

bool fd_limit_in_reserve(int fd, unsigned reserve, unsigned small_share)
{
    static rlim_t soft = RLIM_INFINITY;
    static time_t read_at;
    time_t now = time(NULL);
    if (now != read_at) {
        struct rlimit rl;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
            soft = rl.rlim_cur;
        read_at = now;
    }
    if (soft == RLIM_INFINITY)
        return false;
    rlim_t keep = soft / small_share < reserve ? soft / small_share : reserve;
    return (rlim_t)fd >= soft - keep;
}

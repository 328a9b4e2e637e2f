/* The process's descriptor limit, for the reserves that keep the last descriptors for the
 * API and the store (mapping.c: public connections; splice_relay.c: pipes). */
#ifndef PORTMUX_FD_LIMIT_H
#define PORTMUX_FD_LIMIT_H

#include <stdbool.h>

/* True when descriptor fd is among the last `reserve` ones of RLIMIT_NOFILE's soft limit,
 * or the last 1/`small_share` of a limit too small for that many (reserve 64 of 128 would
 * leave nothing). Linux hands out the lowest free descriptor, so a new one this high means only
 * the reserve is left. The limit is read at most once a second: it may be raised while
 * the process runs. One thread (the loop) calls it. */
bool fd_limit_in_reserve(int fd, unsigned reserve, unsigned small_share);

#endif

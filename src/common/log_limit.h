/* At most one log line of a kind per period, with a count of those held back: for lines
 * a peer can cause once per connection (a public client connecting again and again
 * through a tunnel must not be able to fill the disk). Pure: the caller passes the time. */
#ifndef PORTMUX_LOG_LIMIT_H
#define PORTMUX_LOG_LIMIT_H

#include <stdbool.h>
#include <time.h>

struct log_limit {
    time_t at;             /* when the last line (a burst: the window's first) was written */
    bool written;          /* at least one was */
    unsigned long held;    /* held back since */
    unsigned in_window;    /* lines written in the window that began at `at` (bursts) */
};

/* True when a line may be written at now (none written yet, or period seconds have gone
 * by since the last; a clock that went back counts as gone by). *held then gets how
 * many were held back since the last one written, and the count starts again. False:
 * the line is held back (and counted). */
bool log_limit_take(struct log_limit *l, time_t now, int period, unsigned long *held);

/* The same with up to burst lines per window of period seconds (the window opens with its
 * first line): for lines an operator wants to see each time while they are few (a client
 * connecting), which a peer must still not be able to repeat without end. log_limit_take
 * is a burst of 1. */
bool log_limit_take_burst(struct log_limit *l, time_t now, int period, unsigned burst,
                          unsigned long *held);

#endif

/* At most one log line of a kind per period, with a count of those held back: for lines
 * a peer can cause once per connection (a public client connecting again and again
 * through a tunnel must not be able to fill the disk). Pure: the caller passes the time. */
#ifndef PORTMUX_LOG_LIMIT_H
#define PORTMUX_LOG_LIMIT_H

#include <stdbool.h>
#include <time.h>

struct log_limit {
    time_t at;             /* when the last line of this kind was written */
    bool written;          /* at least one was */
    unsigned long held;    /* held back since */
};

/* True when a line may be written at now (none written yet, or period seconds have gone
 * by since the last; a clock that went back counts as gone by). *held then gets how
 * many were held back since the last one written, and the count starts again. False:
 * the line is held back (and counted). */
bool log_limit_take(struct log_limit *l, time_t now, int period, unsigned long *held);

#endif

/* What a listener does when accept() fails. evconnlistener retries at once, so with no
 * file descriptors left (EMFILE) it spins at 100% CPU and logs as fast as it can; the guard
 * pauses the listener briefly instead and logs at most once a second. */
#ifndef PORTMUX_ACCEPT_GUARD_H
#define PORTMUX_ACCEPT_GUARD_H

struct event_base;
struct evconnlistener;
struct accept_guard;

/* what names the listener in log lines ("port 10022", "tunnel"). Does not own l. */
struct accept_guard *accept_guard_new(struct event_base *base, struct evconnlistener *l,
                                      const char *module, const char *what);
/* NULL-safe. Free it before the listener. */
void accept_guard_free(struct accept_guard *g);
/* Call from the listener's error callback. */
void accept_guard_on_error(struct accept_guard *g);

#endif

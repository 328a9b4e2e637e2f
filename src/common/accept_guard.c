#include "accept_guard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>
#include <event2/listener.h>

#include "log.h"
#include "log_limit.h"

/* Long enough for connections to close and free descriptors, short enough to go unseen. */
#define ACCEPT_PAUSE_MS 100
#define ACCEPT_LOG_SECONDS 10

struct accept_guard {
    struct evconnlistener *listener;
    struct event *resume;
    const char *module;
    char what[64];
};

static void accept_guard_resume_cb(evutil_socket_t fd, short events, void *arg)
{
    struct accept_guard *g = arg;
    evconnlistener_enable(g->listener);
}

struct accept_guard *accept_guard_new(struct event_base *base, struct evconnlistener *l,
                                      const char *module, const char *what)
{
    struct accept_guard *g = calloc(1, sizeof(*g));
    if (!g)
        return NULL;
    g->resume = evtimer_new(base, accept_guard_resume_cb, g);
    if (!g->resume) {
        free(g);
        return NULL;
    }
    g->listener = l;
    g->module = module;
    snprintf(g->what, sizeof(g->what), "%s", what);
    return g;
}

void accept_guard_free(struct accept_guard *g)
{
    if (!g)
        return;
    event_free(g->resume);
    free(g);
}

/* Every listener of the process shares one line per ACCEPT_LOG_SECONDS: out of
 * descriptors, each of a thousand mappings' listeners would say so every pause, and the
 * peers holding the descriptors decide how long that lasts. One thread runs the loop. */
static struct log_limit accept_guard_log;

void accept_guard_on_error(struct accept_guard *g)
{
    int err = EVUTIL_SOCKET_ERROR();
    unsigned long held;
    if (log_limit_take(&accept_guard_log, time(NULL), ACCEPT_LOG_SECONDS, &held))
        log_warn(g->module, "%s: accept failed: %s; pausing %d ms (%lu more such failures "
                            "on this server's listeners in the last %d s)",
                 g->what, strerror(err), ACCEPT_PAUSE_MS, held, ACCEPT_LOG_SECONDS);
    evconnlistener_disable(g->listener);
    struct timeval tv = {0, ACCEPT_PAUSE_MS * 1000};
    evtimer_add(g->resume, &tv);
}

#include "accept_guard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>
#include <event2/listener.h>

#include "log.h"

/* Long enough for connections to close and free descriptors, short enough to go unseen. */
#define ACCEPT_PAUSE_MS 100

struct accept_guard {
    struct evconnlistener *listener;
    struct event *resume;
    const char *module;
    char what[64];
    time_t last_log;
    unsigned long suppressed;
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

void accept_guard_on_error(struct accept_guard *g)
{
    int err = EVUTIL_SOCKET_ERROR();
    time_t now = time(NULL);
    if (now != g->last_log) {
        log_warn(g->module, "%s: accept failed: %s; pausing %d ms%s", g->what, strerror(err),
                 ACCEPT_PAUSE_MS, g->suppressed ? " (repeated)" : "");
        g->last_log = now;
        g->suppressed = 0;
    } else {
        g->suppressed++;
    }
    evconnlistener_disable(g->listener);
    struct timeval tv = {0, ACCEPT_PAUSE_MS * 1000};
    evtimer_add(g->resume, &tv);
}

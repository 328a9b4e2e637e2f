/* portmux-ctl: one HTTP request to the portmux API over libevent's evhttp client. */
#ifndef PORTMUX_CTL_HTTP_H
#define PORTMUX_CTL_HTTP_H

#include <stddef.h>

#include <jansson.h>

#include "ctl.h"

struct ctl_reply {
    int status;     /* HTTP status */
    json_t *json;   /* parsed body, or NULL when it is not JSON */
    char *text;     /* the body as text (NUL-terminated), for messages */
};

/* Sends METHOD PATH (PATH is appended to the API URL's own path) with body as JSON when
 * not NULL, and waits for the answer. Returns CTL_OK with *rep filled (any HTTP status),
 * CTL_USAGE for an unusable API URL, or CTL_UNREACHABLE; err says why. The caller frees
 * *rep with ctl_reply_clear. */
int ctl_http_call(const struct ctl_opts *o, const char *method, const char *path,
                  json_t *body, struct ctl_reply *rep, char *err, size_t errlen);

/* Frees what ctl_http_call put in rep. NULL-safe. */
void ctl_reply_clear(struct ctl_reply *rep);

#endif

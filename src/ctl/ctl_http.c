/* portmux-ctl: one HTTP request to the portmux API over libevent's evhttp client.
 *
 * A CLI makes one request per run, so each call has its own event_base: the loop runs
 * until the answer (or the failure) arrives, then everything is freed. */
#include "ctl_http.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/util.h>

/* The API's largest answer is a mapping list; far below this even with thousands. */
#define CTL_MAX_BODY (64 * 1024 * 1024)
#define CTL_DEFAULT_PORT 80
/* An answer's headers: the API's are a few hundred bytes. */
#define CTL_MAX_HEADERS (64 * 1024)

struct ctl_call {
    struct event_base *base;
    struct ctl_reply *rep;
    enum evhttp_request_error error;
    bool have_error;
    int sock_errno;
    bool answered;
    bool deadline;                 /* --timeout passed before the whole answer was in */
};

static const char *ctl_http_error_name(enum evhttp_request_error e)
{
    switch (e) {
    case EVREQ_HTTP_TIMEOUT: return "no answer before the timeout";
    case EVREQ_HTTP_EOF: return "connection closed before an HTTP answer";
    case EVREQ_HTTP_INVALID_HEADER: return "the answer is not HTTP";
    case EVREQ_HTTP_BUFFER_ERROR: return "read or write error";
    case EVREQ_HTTP_REQUEST_CANCEL: return "request cancelled";
    case EVREQ_HTTP_DATA_TOO_LONG: return "answer too large";
    }
    return "request failed";
}

static void ctl_on_error(enum evhttp_request_error e, void *arg)
{
    struct ctl_call *call = arg;
    call->error = e;
    call->have_error = true;
    call->sock_errno = EVUTIL_SOCKET_ERROR();
}

static void ctl_on_done(struct evhttp_request *req, void *arg)
{
    struct ctl_call *call = arg;
    event_base_loopexit(call->base, NULL);
    if (!req || evhttp_request_get_response_code(req) == 0)
        return; /* a refused connect comes here without the error callback */
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    char *text = malloc(len + 1);
    if (!text)
        return;
    evbuffer_remove(in, text, len);
    text[len] = '\0';
    call->rep->status = evhttp_request_get_response_code(req);
    call->rep->text = text;
    call->rep->json = json_loadb(text, len, 0, NULL);
    call->answered = true;
}

/* --timeout is for the whole answer: evhttp's own timeout starts again with every byte,
 * so a server that trickles its answer (or headers without end) kept ctl waiting for
 * ever. */
static void ctl_on_deadline(evutil_socket_t fd, short what, void *arg)
{
    struct ctl_call *call = arg;
    call->deadline = true;
    event_base_loopexit(call->base, NULL);
}

/* Splits the API URL into what the connection needs. host_hdr keeps IPv6 brackets. */
static int ctl_parse_url(const char *url, char *host, size_t hostlen, char *host_hdr,
                         size_t hdrlen, int *port, char *prefix, size_t prefixlen, char *err,
                         size_t errlen)
{
    if (strchr(url, '@')) {
        /* Checked before any message that shows the URL: a user part may hold a
         * password, and the API takes none there. */
        snprintf(err, errlen, "--api: a user or password in the URL is not used; give the "
                 "token with --token or PORTMUX_API_TOKEN");
        return -1;
    }
    struct evhttp_uri *uri = evhttp_uri_parse_with_flags(url, 0);
    int rc = -1;
    if (!uri || !evhttp_uri_get_host(uri) || !evhttp_uri_get_host(uri)[0]) {
        snprintf(err, errlen, "--api %s: expected http://HOST[:PORT][/PATH]", url);
        goto out;
    }
    const char *scheme = evhttp_uri_get_scheme(uri);
    if (!scheme || strcmp(scheme, "http") != 0) {
        snprintf(err, errlen, "--api %s: only http:// is supported (run portmux-ctl on the "
                 "API's host or through an SSH tunnel)", url);
        goto out;
    }
    const char *h = evhttp_uri_get_host(uri);
    size_t hl = strlen(h);
    *port = evhttp_uri_get_port(uri) < 0 ? CTL_DEFAULT_PORT : evhttp_uri_get_port(uri);
    if (h[0] == '[' && hl > 2 && h[hl - 1] == ']')
        snprintf(host, hostlen, "%.*s", (int)(hl - 2), h + 1);
    else
        snprintf(host, hostlen, "%s", h);
    snprintf(host_hdr, hdrlen, "%s:%d", h, *port);
    const char *p = evhttp_uri_get_path(uri);
    snprintf(prefix, prefixlen, "%s", p ? p : "");
    size_t pl = strlen(prefix);
    while (pl > 0 && prefix[pl - 1] == '/')
        prefix[--pl] = '\0';
    rc = 0;
out:
    if (uri)
        evhttp_uri_free(uri);
    return rc;
}

static int ctl_add_headers(struct evhttp_request *req, const struct ctl_opts *o,
                           const char *host_hdr, bool has_body)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    int rc = evhttp_add_header(h, "Host", host_hdr);
    rc |= evhttp_add_header(h, "Accept", "application/json");
    rc |= evhttp_add_header(h, "User-Agent", "portmux-ctl/" PORTMUX_VERSION);
    rc |= evhttp_add_header(h, "Connection", "close");
    if (has_body)
        rc |= evhttp_add_header(h, "Content-Type", "application/json");
    if (o->token && o->token[0]) {
        char *auth = NULL;
        if (asprintf(&auth, "Bearer %s", o->token) < 0)
            return -1;
        rc |= evhttp_add_header(h, "Authorization", auth);
        free(auth);
    }
    return rc;
}

int ctl_http_call(const struct ctl_opts *o, const char *method, const char *path,
                  json_t *body, struct ctl_reply *rep, char *err, size_t errlen)
{
    char host[256], host_hdr[300], prefix[512], full[1024];
    int port = 0, rc = CTL_UNREACHABLE;
    struct ctl_call call = {.rep = rep};
    struct evhttp_connection *conn = NULL;
    struct event *deadline = NULL;
    char *text = NULL;
    memset(rep, 0, sizeof(*rep));
    if (ctl_parse_url(o->api_url, host, sizeof(host), host_hdr, sizeof(host_hdr), &port,
                      prefix, sizeof(prefix), err, errlen) != 0)
        return CTL_USAGE;
    snprintf(full, sizeof(full), "%s%s", prefix, path);
    call.base = event_base_new();
    if (call.base)
        conn = evhttp_connection_base_new(call.base, NULL, host, (unsigned short)port);
    struct evhttp_request *req = conn ? evhttp_request_new(ctl_on_done, &call) : NULL;
    if (!req) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    evhttp_connection_set_timeout(conn, o->timeout_s);
    evhttp_connection_set_retries(conn, 0);
    evhttp_connection_set_max_body_size(conn, CTL_MAX_BODY);
    evhttp_connection_set_max_headers_size(conn, CTL_MAX_HEADERS);
    deadline = evtimer_new(call.base, ctl_on_deadline, &call);
    struct timeval tv = {o->timeout_s, 0};
    if (!deadline || evtimer_add(deadline, &tv) != 0) {
        evhttp_request_free(req);
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    evhttp_request_set_error_cb(req, ctl_on_error);
    text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    if ((body && !text) || ctl_add_headers(req, o, host_hdr, body != NULL) != 0 ||
        (text && evbuffer_add(evhttp_request_get_output_buffer(req), text, strlen(text)))) {
        evhttp_request_free(req);
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    /* On failure evhttp_make_request frees req itself. */
    if (evhttp_make_request(conn, req, strcmp(method, "POST") == 0 ? EVHTTP_REQ_POST
                                                                   : EVHTTP_REQ_GET,
                            full) != 0) {
        snprintf(err, errlen, "cannot send the request to %s", o->api_url);
        goto out;
    }
    event_base_dispatch(call.base);
    if (call.answered) {
        rc = CTL_OK;
    } else if (call.deadline) {
        snprintf(err, errlen, "cannot reach the API at %s: no whole answer within %d s",
                 o->api_url, o->timeout_s);
    } else {
        const char *why = call.have_error ? ctl_http_error_name(call.error)
                                          : "cannot connect";
        /* A connect in progress leaves EINPROGRESS behind: not the reason. */
        if (call.sock_errno != 0 && call.sock_errno != EINPROGRESS &&
            call.sock_errno != EAGAIN)
            snprintf(err, errlen, "cannot reach the API at %s: %s (%s)", o->api_url, why,
                     strerror(call.sock_errno));
        else
            snprintf(err, errlen, "cannot reach the API at %s: %s", o->api_url, why);
    }
out:
    free(text);
    if (deadline)
        event_free(deadline);
    if (conn)
        evhttp_connection_free(conn);
    if (call.base)
        event_base_free(call.base);
    if (rc != CTL_OK)
        ctl_reply_clear(rep);
    return rc;
}

void ctl_reply_clear(struct ctl_reply *rep)
{
    if (!rep)
        return;
    json_decref(rep->json);
    free(rep->text);
    memset(rep, 0, sizeof(*rep));
}

/* Fuzz target: a whole API request — method, URL, headers and body — through api_dispatch,
 * the function the MHD handler calls, against a real registry and an in-memory store.
 *
 * Input: "METHOD URL[ VERSION]\n" then "Name: value\n" lines, an empty line, then the body
 * (\r before \n is dropped, as HTTP writes it). Seeds: tests/fuzz/corpus/fuzz_api_request/.
 *
 * Oracles besides the sanitizers: every answer is a well-formed envelope (or a console
 * asset, or /metrics text); nothing succeeds for a Host or Origin the guard refuses, or for
 * a token-protected path without the right bearer token; no mapping ever exists (the only
 * port the range allows is held by this process, so a create that passes validation reaches
 * the bind and is refused there, and nothing listens on a public address). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>

#include "api.h"
#include "api_guard.h"
#include "clients.h"
#include "config.h"
#include "log.h"
#include "mapping.h"
#include "server.h"
#include "store.h"

#define FUZZ_TOKEN "fuzz-token-0123456789"
#define FUZZ_MAX_HEADERS 32
#define FUZZ_MAX_BODY (64 * 1024)

struct fuzz_headers {
    char *name[FUZZ_MAX_HEADERS];
    char *value[FUZZ_MAX_HEADERS];
    size_t n;
};

static struct config fuzz_cfg;
static struct server fuzz_srv;
static struct sockaddr_in fuzz_peer;

static const char *fuzz_header(void *ctx, const char *name)
{
    const struct fuzz_headers *h = ctx;
    for (size_t i = 0; i < h->n; i++)
        if (strcasecmp(h->name[i], name) == 0)
            return h->value[i];
    return NULL;
}

/* Holds 127.0.0.1:P listening for the whole run; returns P. */
static int fuzz_hold_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sin);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0 || listen(fd, 1) != 0 ||
        getsockname(fd, (struct sockaddr *)&sin, &len) != 0)
        abort();
    return ntohs(sin.sin_port);
}

static void fuzz_init(void)
{
    char yaml[512], err[256];
    int port = fuzz_hold_port();
    snprintf(yaml, sizeof(yaml),
             "port_range: {from: %d, end: %d}\n"
             "tunnel: {enabled: false}\n"
             "api: {token: %s, allowed_hosts: [portmux.example.com, 10.9.8.7]}\n",
             port, port, FUZZ_TOKEN);
    if (config_init_defaults(&fuzz_cfg) != 0 ||
        config_load_string(&fuzz_cfg, yaml, strlen(yaml), "fuzz", err, sizeof(err)) != 0)
        abort();
    log_set_level(LOGL_ERROR);
    fuzz_srv.cfg = &fuzz_cfg;
    fuzz_srv.started_at = time(NULL);
    fuzz_srv.base = event_base_new();
    fuzz_srv.store = store_open(":memory:", NULL, err, sizeof(err));
    fuzz_srv.mappings = mapping_registry_new(&fuzz_srv);
    if (fuzz_srv.store)
        fuzz_srv.clients = clients_registry_new(&fuzz_cfg, fuzz_srv.store, err, sizeof(err));
    if (!fuzz_srv.base || !fuzz_srv.store || !fuzz_srv.mappings || !fuzz_srv.clients)
        abort();
    fuzz_peer.sin_family = AF_INET;
    fuzz_peer.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    fuzz_peer.sin_port = htons(40000);
}

/* Next line of [*p, end) as a new string without its \r\n; NULL at the end. */
static char *fuzz_line(const char **p, const char *end)
{
    if (*p >= end)
        return NULL;
    const char *nl = memchr(*p, '\n', (size_t)(end - *p));
    const char *stop = nl ? nl : end;
    size_t n = (size_t)(stop - *p);
    if (n > 0 && (*p)[n - 1] == '\r')
        n--;
    char *s = strndup(*p, n);
    *p = nl ? nl + 1 : end;
    if (!s)
        abort();
    return s;
}

static void fuzz_check_envelope(const struct api_reply *r)
{
    json_error_t jerr;
    json_t *j = json_loadb(r->body, r->len, 0, &jerr);
    if (!json_is_object(j))
        abort();
    json_t *ok = json_object_get(j, "success");
    if (json_is_boolean(ok)) {
        bool failed = r->status >= 400;
        if (json_is_true(ok) == failed || (failed && !json_is_string(json_object_get(j, "error"))))
            abort();
    } else if (!json_is_string(json_object_get(j, "status"))) { /* /health has no envelope */
        abort();
    }
    json_decref(j);
}

static bool fuzz_is_protected(const char *url)
{
    return strncmp(url, "/api/", 5) == 0 || strcmp(url, "/metrics") == 0;
}

static void fuzz_check(const struct api_req *rq, const struct fuzz_headers *h,
                       const struct api_reply *r)
{
    if (r->close)
        return; /* out of memory: nothing to check */
    if (r->status < 200 || r->status > 599)
        abort();
    if (r->asset == NULL && (r->type == NULL || (r->len > 0 && r->body == NULL)))
        abort();
    if (r->type && strcmp(r->type, "application/json") == 0)
        fuzz_check_envelope(r);
    if (r->status < 300) {
        const char *host = fuzz_header((void *)h, "Host");
        if (!api_guard_host_ok(&fuzz_cfg, host) ||
            !api_guard_origin_ok(&fuzz_cfg, fuzz_header((void *)h, "Origin"), host,
                                 fuzz_header((void *)h, "Sec-Fetch-Site")))
            abort();
        const char *auth = fuzz_header((void *)h, "Authorization");
        /* The scheme is case-insensitive (RFC 7235 section 2.1); the token is not. */
        if (fuzz_is_protected(rq->url) &&
            (!auth || strncasecmp(auth, "Bearer ", 7) != 0 || strcmp(auth + 7, FUZZ_TOKEN) != 0))
            abort();
    }
    if (r->status == 421 && api_guard_host_ok(&fuzz_cfg, fuzz_header((void *)h, "Host")))
        abort();
    if (mapping_registry_count(fuzz_srv.mappings) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    if (!ready) {
        fuzz_init();
        ready = 1;
    }
    const char *p = (const char *)data, *end = p + size;
    struct fuzz_headers h = {0};
    char *first = fuzz_line(&p, end);
    if (!first)
        return 0;
    /* "METHOD URL VERSION": MHD hands over method and URL as separate strings. */
    char *url = strchr(first, ' ');
    if (url) {
        *url++ = '\0';
        char *sp = strchr(url, ' ');
        if (sp)
            *sp = '\0';
    }
    for (;;) {
        char *line = fuzz_line(&p, end);
        if (!line)
            break;
        char *colon = strchr(line, ':');
        if (!colon || h.n == FUZZ_MAX_HEADERS) {
            free(line);
            break; /* the empty line (or more headers than we keep): the body starts */
        }
        *colon = '\0';
        char *v = colon + 1;
        v += strspn(v, " \t");
        h.name[h.n] = line;
        h.value[h.n] = v;
        h.n++;
    }
    size_t blen = (size_t)(end - p);
    char *body = NULL;
    if (blen > 0 && blen <= FUZZ_MAX_BODY) {
        body = malloc(blen + 1);
        if (!body)
            abort();
        memcpy(body, p, blen);
        body[blen] = '\0';
    }
    struct api_req rq = {
        .method = first,
        .url = url ? url : "/",
        .peer = (const struct sockaddr *)&fuzz_peer,
        .header = fuzz_header,
        .header_ctx = &h,
        .body = body,
        .len = body ? blen : 0,
        .too_large = blen > FUZZ_MAX_BODY,
    };
    struct api_reply out = {0};
    api_dispatch(&fuzz_srv, &rq, &out);
    fuzz_check(&rq, &h, &out);
    api_reply_clear(&out);
    free(body);
    for (size_t i = 0; i < h.n; i++)
        free(h.name[i]);
    free(first);
    return 0;
}

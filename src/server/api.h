/* The HTTP management API (SPEC §3) on libmicrohttpd. Owns struct api. */
#ifndef PORTMUX_API_H
#define PORTMUX_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct server;
struct api;
struct sockaddr;
struct web_asset;

/* Starts MHD on api.listen_addr:listen_port inside the server's event loop. */
struct api *api_new(struct server *srv, char *err, size_t errlen);
/* Stops accepting and closes every API connection. NULL-safe. */
void api_free(struct api *api);
/* The bound port (useful when listen_port is 0). */
int api_port(const struct api *api);


/* One request as api_dispatch sees it. No MHD object: the MHD glue and the fuzz target
 * (tests/fuzz/fuzz_api_request.c) go through exactly the same decisions. */
struct api_req {
    const char *method;
    const char *url;
    const struct sockaddr *peer;   /* NULL: unknown (refused when api.allowed_ips is set) */
    /* A request header by name (case-insensitive), or NULL when absent. */
    const char *(*header)(void *ctx, const char *name);
    void *header_ctx;
    const char *body;              /* NUL-terminated; NULL when there is none */
    size_t len;
    bool too_large;                /* the body passed 64 KiB and was not kept */
};

/* What to answer. body is owned by the reply (api_reply_clear frees it), except a console
 * asset, which is static. */
struct api_pending;

struct api_reply {
    unsigned status;
    const char *type;              /* Content-Type, static */
    char *body;
    size_t len;
    const struct web_asset *asset; /* set instead of body for the console's files */
    const char *allow;             /* Allow header for 405, static */
    bool close;                    /* no answer possible (out of memory): drop the connection */
    bool last;                     /* answer, then close (Connection: close) */
    /* Set when a handler started a write that finishes later (SPEC §7): the answer is not
     * there yet. api_dispatch clears it when the write finished before it returned
     * (SQLite always does), so only a caller on a loop with PostgreSQL ever sees it; the
     * MHD glue then suspends the connection until the answer is in. */
    struct api_pending *pending;
};

/* The checks that need no body, in order: api.allowed_ips (403 forbidden), Host (421
 * bad_host), Origin/Sec-Fetch-Site (403 cross_origin), path (404), method (405), token
 * (401), Content-Length (413). True when the request may go on; else *out is the refusal. */
bool api_admit(struct server *srv, const struct api_req *rq, struct api_reply *out);
/* The whole request: api_admit, then the route's handler. Fills *out. */
void api_dispatch(struct server *srv, const struct api_req *rq, struct api_reply *out);
/* Frees what a reply owns and zeroes it. */
void api_reply_clear(struct api_reply *r);

#endif

/* The web console's files, compiled into the binary from web/ (cmake/embed.cmake). */
#ifndef PORTMUX_WEB_H
#define PORTMUX_WEB_H

#include <stddef.h>

struct MHD_Response;

struct web_asset {
    const char *path;          /* URL path: "/" or "/ui/app.js" */
    const unsigned char *data;
    size_t len;
    const char *content_type;
};

/* The asset served at url, or NULL (unknown paths are 404). */
const struct web_asset *web_find(const char *url);

/* Content-Type, Cache-Control and the Content-Security-Policy for an asset. */
void web_add_headers(struct MHD_Response *resp, const struct web_asset *a);

#endif

#include "web.h"

#include <string.h>

#include <microhttpd.h>

#include "embed.h"

extern const struct embedded_file embedded_web[];
extern const size_t embedded_web_count;

/* No inline script or style and nothing from another origin: the console only talks to
 * this server's API. */
#define WEB_CSP                                                                          \
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "   \
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

static const struct {
    const char *ext;
    const char *type;
} web_types[] = {
    {".html", "text/html; charset=utf-8"},
    {".js", "text/javascript; charset=utf-8"},
    {".css", "text/css; charset=utf-8"},
    {".svg", "image/svg+xml"},
    {".png", "image/png"},
    {".ico", "image/x-icon"},
    {".json", "application/json"},
};

static const char *web_type_of(const char *path)
{
    const char *dot = strrchr(path, '.');
    for (size_t i = 0; dot && i < sizeof(web_types) / sizeof(web_types[0]); i++)
        if (strcmp(dot, web_types[i].ext) == 0)
            return web_types[i].type;
    return "application/octet-stream";
}

const struct web_asset *web_find(const char *url)
{
    static struct web_asset found;
    const char *want = strcmp(url, "/") == 0 ? "index.html"
                       : strncmp(url, "/ui/", 4) == 0 ? url + 4
                                                      : NULL;
    if (!want || !*want)
        return NULL;
    for (size_t i = 0; i < embedded_web_count; i++) {
        if (strcmp(embedded_web[i].path, want) == 0) {
            found = (struct web_asset){url, embedded_web[i].data, embedded_web[i].len,
                                       web_type_of(embedded_web[i].path)};
            return &found;
        }
    }
    return NULL;
}

void web_add_headers(struct MHD_Response *resp, const struct web_asset *a)
{
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, a->content_type);
    /* The files are tiny; no-cache keeps page, script and style of one version together
     * right after an upgrade. */
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    MHD_add_response_header(resp, "Content-Security-Policy", WEB_CSP);
    MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
}

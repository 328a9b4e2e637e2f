/* portmux-ctl: one API call and its outcome (exit status, error line), shared by verbs. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "ctl_http.h"
#include "ctl_table.h"

int ctl_api(const struct ctl_opts *o, const char *method, const char *path, json_t *body,
            struct ctl_reply *rep, json_t **data)
{
    char err[1400];
    *data = NULL;
    int rc = ctl_http_call(o, method, path, body, rep, err, sizeof(err));
    if (rc != CTL_OK) {
        fprintf(stderr, "portmux-ctl: %s\n", err);
        return rc;
    }
    json_t *j = rep->json;
    if (rep->status >= 200 && rep->status < 300 && json_is_object(j)) {
        json_t *d = json_object_get(j, "data");
        *data = json_is_true(json_object_get(j, "success")) && d ? d : j;
        return CTL_OK;
    }
    const char *code = json_string_value(json_object_get(j, "error"));
    const char *msg = json_string_value(json_object_get(j, "message"));
    if (code) {
        /* The code first: it is what scripts and the SPEC's error table name. */
        char c[128], m[512];
        snprintf(c, sizeof(c), "%s", code);
        snprintf(m, sizeof(m), "%s", msg ? msg : "");
        fprintf(stderr, "portmux-ctl: %s: %s (HTTP %d)\n", ctl_clean(c), ctl_clean(m),
                rep->status);
    } else {
        fprintf(stderr, "portmux-ctl: HTTP %d from %s%s: not an answer from the portmux API\n",
                rep->status, o->api_url, path);
    }
    return CTL_REFUSED;
}

void ctl_print_json(const json_t *data)
{
    /* \uXXXX for everything beyond ASCII, and for DEL, which jansson leaves raw: still the
     * same JSON, and a string holding UTF-8's C1 controls (CSI, OSC) reaches no terminal
     * raw. A raw 0x7f can only be inside a string. */
    char *text = json_dumps(data, JSON_INDENT(2) | JSON_REAL_PRECISION(15) | JSON_ENCODE_ANY |
                                      JSON_ENSURE_ASCII);
    if (text) {
        for (const char *p = text; *p; p++) {
            if (*p == 0x7f)
                fputs("\\u007f", stdout);
            else
                putchar(*p);
        }
        putchar('\n');
        free(text);
    }
}

int ctl_parse_int(const char *what, const char *s, long long min, long long max,
                  long long *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max) {
        fprintf(stderr, "portmux-ctl: %s: expected an integer %lld..%lld, got '%s'\n", what,
                min, max, s);
        return -1;
    }
    *out = v;
    return 0;
}

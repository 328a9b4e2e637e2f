/* portmux-ctl: shared types of the management CLI (one API endpoint, exit statuses). */
#ifndef PORTMUX_CTL_H
#define PORTMUX_CTL_H

#include <stdbool.h>

#include <jansson.h>

/* Exit statuses, documented in portmux-ctl(1): scripts branch on them. */
enum ctl_exit {
    CTL_OK = 0,
    CTL_REFUSED = 1,     /* the API answered with an error (its code is printed) */
    CTL_USAGE = 2,       /* bad command line */
    CTL_UNREACHABLE = 3, /* no HTTP answer from the server */
};

/* Where the API is and how to talk to it; filled by main.c from flags and environment. */
struct ctl_opts {
    const char *api_url;  /* http://HOST[:PORT][/PREFIX] */
    const char *token;    /* "" or NULL = no Authorization header */
    bool json;            /* print the API's data as JSON instead of a table */
    int timeout_s;        /* per request */
};

struct ctl_reply;

/* Sends one API request and sorts out the outcome: on a 2xx answer returns CTL_OK with
 * *data pointing into rep (the envelope's "data", or the whole body for /health);
 * otherwise prints why on stderr (the API's error code and message) and returns
 * CTL_REFUSED, CTL_USAGE or CTL_UNREACHABLE. The caller clears rep in every case. */
int ctl_api(const struct ctl_opts *o, const char *method, const char *path, json_t *body,
            struct ctl_reply *rep, json_t **data);

/* Prints data as indented JSON with a final newline (--json). */
void ctl_print_json(const json_t *data);

/* Parses a decimal integer argument; prints a usage error naming what and returns -1. */
int ctl_parse_int(const char *what, const char *s, long long min, long long max,
                  long long *out);

/* Runs `mapping ...`; argv[0] is the verb. Returns an enum ctl_exit. */
int ctl_mapping_main(const struct ctl_opts *o, int argc, char **argv);

/* Runs `client ...`; argv[0] is the verb. Returns an enum ctl_exit. */
int ctl_client_main(const struct ctl_opts *o, int argc, char **argv);

/* Runs `health`. Returns an enum ctl_exit. */
int ctl_health_main(const struct ctl_opts *o, int argc, char **argv);

#endif

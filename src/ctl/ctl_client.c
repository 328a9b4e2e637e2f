/* portmux-ctl client add|list|rotate|rm and health: the tunnel client endpoints (SPEC §4a)
 * and /health. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "ctl.h"
#include "ctl_http.h"
#include "ctl_table.h"

/* POSTs {"name": NAME, ...extra} to path; prints the data as JSON or through show. */
static int ctl_client_post(const struct ctl_opts *o, const char *path, json_t *body,
                           void (*show)(const json_t *data))
{
    struct ctl_reply rep;
    json_t *data = NULL;
    int rc = ctl_api(o, "POST", path, body, &rep, &data);
    if (rc == CTL_OK && o->json)
        ctl_print_json(data);
    else if (rc == CTL_OK)
        show(data);
    ctl_reply_clear(&rep);
    json_decref(body);
    return rc;
}

/* The string at key, cleaned for the terminal (ctl_clean), or "-". */
static const char *ctl_str(const json_t *data, const char *key, char *buf, size_t len)
{
    const char *s = json_string_value(json_object_get(data, key));
    snprintf(buf, len, "%s", s ? s : "-");
    return ctl_clean(buf);
}

static void ctl_show_created(const json_t *d)
{
    char name[128], token[256];
    printf("created client %s\ntoken: %s\n(the token is shown this once: give it to "
           "portmux-client --token)\n", ctl_str(d, "name", name, sizeof(name)),
           ctl_str(d, "token", token, sizeof(token)));
}

static void ctl_show_rotated(const json_t *d)
{
    char until[64], name[128], token[256];
    ctl_cell(json_object_get(d, "old_token_valid_until"), until, sizeof(until));
    printf("rotated client %s\ntoken: %s\nthe old token is valid until %s\n",
           ctl_str(d, "name", name, sizeof(name)), ctl_str(d, "token", token, sizeof(token)),
           until);
}

static void ctl_show_removed(const json_t *d)
{
    char name[128];
    printf("removed client %s\n", ctl_str(d, "name", name, sizeof(name)));
}

static int ctl_need_name(int argc, char **argv, const char *usage)
{
    if (argc == 2 && argv[1][0] != '\0' && argv[1][0] != '-')
        return 0;
    fprintf(stderr, "portmux-ctl: usage: client %s\n", usage);
    return -1;
}

static int ctl_client_add(const struct ctl_opts *o, int argc, char **argv)
{
    if (ctl_need_name(argc, argv, "add NAME") != 0)
        return CTL_USAGE;
    return ctl_client_post(o, "/api/client/create", json_pack("{s:s}", "name", argv[1]),
                           ctl_show_created);
}

static int ctl_client_rm(const struct ctl_opts *o, int argc, char **argv)
{
    if (ctl_need_name(argc, argv, "rm NAME") != 0)
        return CTL_USAGE;
    return ctl_client_post(o, "/api/client/remove", json_pack("{s:s}", "name", argv[1]),
                           ctl_show_removed);
}

/* `client rotate NAME [--grace SECONDS]` */
static int ctl_client_rotate(const struct ctl_opts *o, int argc, char **argv)
{
    static const struct option opts[] = {{"grace", required_argument, NULL, 'g'},
                                         {NULL, 0, NULL, 0}};
    long long grace = -1;
    int c;
    /* 0, not 1: glibc re-reads the option string (main parsed with "+"), so options may
     * follow the NAME. */
    optind = 0;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c != 'g' || ctl_parse_int("--grace", optarg, 0, 100000000, &grace) != 0) {
            if (c != 'g')
                fprintf(stderr, "portmux-ctl: client rotate: unknown or incomplete option "
                                "'%s'\n", argv[optind - 1]);
            return CTL_USAGE;
        }
    }
    if (optind != argc - 1 || argv[optind][0] == '\0') {
        fprintf(stderr, "portmux-ctl: usage: client rotate NAME [--grace SECONDS]\n");
        return CTL_USAGE;
    }
    json_t *body = json_pack("{s:s}", "name", argv[optind]);
    if (body && grace >= 0)
        json_object_set_new(body, "grace_s", json_integer(grace));
    return ctl_client_post(o, "/api/client/rotate", body, ctl_show_rotated);
}

static const char *const ctl_client_cols[] = {
    "NAME", "SOURCE", "CONNECTED", "REMOTE", "STREAMS", "RTT_MS", "IN", "OUT", "LAST_SEEN",
};
#define CTL_CLIENT_NCOLS (sizeof(ctl_client_cols) / sizeof(ctl_client_cols[0]))

static int ctl_client_print(const json_t *clients)
{
    static const char *const keys[CTL_CLIENT_NCOLS] = {
        "name", "source", "connected", "remote_addr", "streams", "rtt_ms", "bytes_in",
        "bytes_out", "last_seen",
    };
    struct ctl_table *t = ctl_table_new(ctl_client_cols, CTL_CLIENT_NCOLS);
    size_t i;
    const json_t *cl;
    if (!t)
        return CTL_REFUSED;
    json_array_foreach(clients, i, cl) {
        char cells[CTL_CLIENT_NCOLS][320];
        const char *ptrs[CTL_CLIENT_NCOLS];
        for (size_t k = 0; k < CTL_CLIENT_NCOLS; k++) {
            ctl_cell(json_object_get(cl, keys[k]), cells[k], sizeof(cells[k]));
            ptrs[k] = cells[k];
        }
        /* Before the stored clients land, /api/clients lists live sessions only. */
        if (!json_object_get(cl, "connected"))
            snprintf(cells[2], sizeof(cells[2]), "yes");
        ctl_table_add(t, ptrs);
    }
    ctl_table_print(t, stdout);
    ctl_table_free(t);
    return CTL_OK;
}

static int ctl_client_list(const struct ctl_opts *o, int argc, char **argv)
{
    if (argc != 1) {
        fprintf(stderr, "portmux-ctl: usage: client list\n");
        return CTL_USAGE;
    }
    struct ctl_reply rep;
    json_t *data = NULL;
    int rc = ctl_api(o, "GET", "/api/clients", NULL, &rep, &data);
    if (rc == CTL_OK && o->json)
        ctl_print_json(data);
    else if (rc == CTL_OK)
        rc = ctl_client_print(json_object_get(data, "clients"));
    ctl_reply_clear(&rep);
    return rc;
}

int ctl_client_main(const struct ctl_opts *o, int argc, char **argv)
{
    static const struct {
        const char *verb;
        int (*fn)(const struct ctl_opts *, int, char **);
    } verbs[] = {
        {"add", ctl_client_add},       {"create", ctl_client_add}, {"list", ctl_client_list},
        {"ls", ctl_client_list},       {"rotate", ctl_client_rotate},
        {"rm", ctl_client_rm},         {"remove", ctl_client_rm},
    };
    for (size_t i = 0; argc > 0 && i < sizeof(verbs) / sizeof(verbs[0]); i++) {
        if (strcmp(argv[0], verbs[i].verb) == 0)
            return verbs[i].fn(o, argc, argv);
    }
    fprintf(stderr, "portmux-ctl: usage: client add|list|rotate|rm ... (see portmux-ctl "
                    "--help)\n");
    return CTL_USAGE;
}

int ctl_health_main(const struct ctl_opts *o, int argc, char **argv)
{
    if (argc != 1) {
        fprintf(stderr, "portmux-ctl: usage: health\n");
        return CTL_USAGE;
    }
    struct ctl_reply rep;
    json_t *data = NULL;
    int rc = ctl_api(o, "GET", "/health", NULL, &rep, &data);
    if (rc == CTL_OK && o->json) {
        ctl_print_json(data);
    } else if (rc == CTL_OK) {
        const char *key;
        json_t *v;
        json_object_foreach(data, key, v) {
            char cell[320], k[64];
            ctl_cell(v, cell, sizeof(cell));
            snprintf(k, sizeof(k), "%s", key);
            printf("%-17s %s\n", ctl_clean(k), cell);
        }
    }
    ctl_reply_clear(&rep);
    return rc;
}

/* portmux-ctl mapping add|list|update|rm: the mapping endpoints of the API (SPEC §2, §3). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "ctl_http.h"
#include "ctl_table.h"

/* The API checks every value; the CLI only checks that integers are integers. */
#define CTL_INT_MAX 4000000000000LL

enum {
    OPT_PORT = 1000, OPT_TARGET_IP, OPT_TARGET_PORT, OPT_TUNNEL, OPT_DIRECT, OPT_CLIENT,
    OPT_NAME, OPT_ALLOW_FROM, OPT_ALLOW_ANY, OPT_PROXY, OPT_MAXCONN, OPT_RATE, OPT_ENABLE,
    OPT_DISABLE,
};

static const struct option ctl_mapping_opts[] = {
    {"port", required_argument, NULL, OPT_PORT},
    {"target-ip", required_argument, NULL, OPT_TARGET_IP},
    {"target-port", required_argument, NULL, OPT_TARGET_PORT},
    {"tunnel", no_argument, NULL, OPT_TUNNEL},
    {"direct", no_argument, NULL, OPT_DIRECT},
    {"client", required_argument, NULL, OPT_CLIENT},
    {"name", required_argument, NULL, OPT_NAME},
    {"allow-from", required_argument, NULL, OPT_ALLOW_FROM},
    {"allow-any", no_argument, NULL, OPT_ALLOW_ANY},
    {"proxy-protocol", required_argument, NULL, OPT_PROXY},
    {"max-connections", required_argument, NULL, OPT_MAXCONN},
    {"rate-limit", required_argument, NULL, OPT_RATE},
    {"enable", no_argument, NULL, OPT_ENABLE},
    {"disable", no_argument, NULL, OPT_DISABLE},
    {NULL, 0, NULL, 0},
};

static int ctl_set_int(json_t *obj, const char *key, const char *flag, const char *arg)
{
    long long v;
    if (ctl_parse_int(flag, arg, 0, CTL_INT_MAX, &v) != 0)
        return -1;
    return json_object_set_new(obj, key, json_integer(v));
}

/* --allow-from may be given several times and each may hold a comma-separated list. */
static int ctl_add_cidrs(json_t *obj, const char *arg)
{
    json_t *arr = json_object_get(obj, "allow_from");
    if (!arr) {
        arr = json_array();
        if (json_object_set_new(obj, "allow_from", arr) != 0)
            return -1;
    }
    char *copy = strdup(arg), *save = NULL;
    if (!copy)
        return -1;
    for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save))
        json_array_append_new(arr, json_string(t));
    free(copy);
    return 0;
}

static int ctl_mapping_opt(json_t *obj, int c, const char *arg)
{
    switch (c) {
    case OPT_PORT: return ctl_set_int(obj, "port", "--port", arg);
    case OPT_TARGET_IP: return json_object_set_new(obj, "target_ip", json_string(arg));
    case OPT_TARGET_PORT: return ctl_set_int(obj, "target_port", "--target-port", arg);
    case OPT_TUNNEL: return json_object_set_new(obj, "use_tunnel", json_true());
    case OPT_DIRECT: return json_object_set_new(obj, "use_tunnel", json_false());
    case OPT_CLIENT: return json_object_set_new(obj, "client", json_string(arg));
    case OPT_NAME: return json_object_set_new(obj, "name", json_string(arg));
    case OPT_ALLOW_FROM: return ctl_add_cidrs(obj, arg);
    case OPT_ALLOW_ANY: return json_object_set_new(obj, "allow_from", json_array());
    case OPT_PROXY: return json_object_set_new(obj, "proxy_protocol", json_string(arg));
    case OPT_MAXCONN: return ctl_set_int(obj, "max_connections", "--max-connections", arg);
    case OPT_RATE: return ctl_set_int(obj, "rate_limit", "--rate-limit", arg);
    case OPT_ENABLE: return json_object_set_new(obj, "enabled", json_true());
    case OPT_DISABLE: return json_object_set_new(obj, "enabled", json_false());
    }
    return -1;
}

/* Parses the field options of add/update into a JSON object; positional arguments are
 * left at argv[optind..]. NULL on a usage error (already printed). */
static json_t *ctl_mapping_fields(int argc, char **argv, const char *verb)
{
    json_t *obj = json_object();
    int c;
    /* 0, not 1: glibc re-reads the option string (main parsed with "+"), so options may
     * follow the PORT. */
    optind = 0;
    opterr = 0;
    while (obj && (c = getopt_long(argc, argv, "", ctl_mapping_opts, NULL)) != -1) {
        if (c == '?' || c == ':') {
            fprintf(stderr, "portmux-ctl: mapping %s: unknown or incomplete option '%s'\n",
                    verb, argv[optind - 1]);
            json_decref(obj);
            return NULL;
        }
        if (ctl_mapping_opt(obj, c, optarg) != 0) {
            json_decref(obj);
            return NULL;
        }
    }
    return obj;
}

static void ctl_mapping_target(const json_t *m, char *buf, size_t len)
{
    const char *ip = json_string_value(json_object_get(m, "target_ip"));
    json_int_t port = json_integer_value(json_object_get(m, "target_port"));
    bool v6 = ip && strchr(ip, ':');
    snprintf(buf, len, "%s%s%s:%lld", v6 ? "[" : "", ip && ip[0] ? ip : "127.0.0.1",
             v6 ? "]" : "", (long long)port);
}

static const char *const ctl_mapping_cols[] = {
    "PORT", "MODE", "TARGET", "CLIENT", "STATUS", "ACTIVE", "TOTAL", "FAILED", "IN", "OUT",
    "NAME",
};
#define CTL_MAPPING_NCOLS (sizeof(ctl_mapping_cols) / sizeof(ctl_mapping_cols[0]))

static int ctl_mapping_row(struct ctl_table *t, const json_t *m)
{
    static const char *const keys[] = {"port", NULL, NULL, "client", "status",
                                       "active_connections", "total_connections",
                                       "failed_connections", "bytes_in", "bytes_out", "name"};
    char cells[CTL_MAPPING_NCOLS][320];
    const char *ptrs[CTL_MAPPING_NCOLS];
    bool tunnel = json_is_true(json_object_get(m, "use_tunnel"));
    for (size_t i = 0; i < CTL_MAPPING_NCOLS; i++) {
        ptrs[i] = cells[i];
        if (keys[i])
            ctl_cell(json_object_get(m, keys[i]), cells[i], sizeof(cells[i]));
    }
    snprintf(cells[1], sizeof(cells[1]), "%s", tunnel ? "tunnel" : "direct");
    ctl_mapping_target(m, cells[2], sizeof(cells[2]));
    if (!tunnel || !cells[3][0])
        snprintf(cells[3], sizeof(cells[3]), "-");
    if (!cells[10][0])
        snprintf(cells[10], sizeof(cells[10]), "-");
    return ctl_table_add(t, ptrs);
}

/* Prints mappings as a table, then one line per mapping with an error to explain. */
static int ctl_mapping_print(const json_t *mappings)
{
    struct ctl_table *t = ctl_table_new(ctl_mapping_cols, CTL_MAPPING_NCOLS);
    size_t i;
    const json_t *m;
    if (!t)
        return CTL_REFUSED;
    json_array_foreach(mappings, i, m) ctl_mapping_row(t, m);
    ctl_table_print(t, stdout);
    ctl_table_free(t);
    json_array_foreach(mappings, i, m) {
        json_int_t port = json_integer_value(json_object_get(m, "port"));
        const char *err = json_string_value(json_object_get(m, "error"));
        const char *last = json_string_value(json_object_get(m, "last_error"));
        char text[512];
        if (err) {
            snprintf(text, sizeof(text), "%s", err);
            printf("port %lld: error: %s\n", (long long)port, ctl_clean(text));
        }
        if (last) {
            snprintf(text, sizeof(text), "%s", last);
            printf("port %lld: last failed connection: %s\n", (long long)port,
                   ctl_clean(text));
        }
    }
    return CTL_OK;
}

/* Sends body to path and prints the mapping in the answer. */
static int ctl_mapping_send(const struct ctl_opts *o, const char *path, json_t *body,
                            const char *done)
{
    struct ctl_reply rep;
    json_t *data = NULL;
    int rc = ctl_api(o, "POST", path, body, &rep, &data);
    if (rc == CTL_OK && o->json) {
        ctl_print_json(data);
    } else if (rc == CTL_OK) {
        json_t *one = json_pack("[O]", data);
        printf("%s mapping on port %lld\n", done,
               (long long)json_integer_value(json_object_get(data, "port")));
        if (one && json_object_get(data, "target_port"))
            ctl_mapping_print(one);
        json_decref(one);
    }
    ctl_reply_clear(&rep);
    return rc;
}

static int ctl_mapping_add(const struct ctl_opts *o, int argc, char **argv)
{
    json_t *body = ctl_mapping_fields(argc, argv, "add");
    if (!body)
        return CTL_USAGE;
    if (optind < argc) {
        fprintf(stderr, "portmux-ctl: mapping add: unexpected argument '%s'\n", argv[optind]);
        json_decref(body);
        return CTL_USAGE;
    }
    int rc = ctl_mapping_send(o, "/api/mapping/create", body, "created");
    json_decref(body);
    return rc;
}

/* `mapping update PORT [fields]`: PORT may also come as --port. */
static int ctl_mapping_update(const struct ctl_opts *o, int argc, char **argv)
{
    json_t *body = ctl_mapping_fields(argc, argv, "update");
    int rc = CTL_USAGE;
    if (!body)
        return CTL_USAGE;
    if (optind < argc && ctl_set_int(body, "port", "PORT", argv[optind++]) != 0)
        goto out;
    if (optind < argc || !json_object_get(body, "port") || json_object_size(body) < 2) {
        fprintf(stderr, "portmux-ctl: usage: mapping update PORT FIELD-OPTIONS...\n");
        goto out;
    }
    rc = ctl_mapping_send(o, "/api/mapping/update", body, "updated");
out:
    json_decref(body);
    return rc;
}

static int ctl_mapping_rm(const struct ctl_opts *o, int argc, char **argv)
{
    long long port;
    if (argc != 2) {
        fprintf(stderr, "portmux-ctl: usage: mapping rm PORT\n");
        return CTL_USAGE;
    }
    if (ctl_parse_int("PORT", argv[1], 0, CTL_INT_MAX, &port) != 0)
        return CTL_USAGE;
    json_t *body = json_pack("{s:I}", "port", (json_int_t)port);
    struct ctl_reply rep;
    json_t *data = NULL;
    int rc = ctl_api(o, "POST", "/api/mapping/remove", body, &rep, &data);
    if (rc == CTL_OK && o->json)
        ctl_print_json(data);
    else if (rc == CTL_OK)
        printf("removed mapping on port %lld\n", port);
    ctl_reply_clear(&rep);
    json_decref(body);
    return rc;
}

static int ctl_mapping_list(const struct ctl_opts *o, int argc, char **argv)
{
    if (argc != 1) {
        fprintf(stderr, "portmux-ctl: usage: mapping list\n");
        return CTL_USAGE;
    }
    struct ctl_reply rep;
    json_t *data = NULL;
    int rc = ctl_api(o, "GET", "/api/mapping/list", NULL, &rep, &data);
    if (rc == CTL_OK && o->json)
        ctl_print_json(data);
    else if (rc == CTL_OK)
        rc = ctl_mapping_print(json_object_get(data, "mappings"));
    ctl_reply_clear(&rep);
    return rc;
}

int ctl_mapping_main(const struct ctl_opts *o, int argc, char **argv)
{
    static const struct {
        const char *verb;
        int (*fn)(const struct ctl_opts *, int, char **);
    } verbs[] = {
        {"add", ctl_mapping_add},     {"create", ctl_mapping_add}, {"list", ctl_mapping_list},
        {"ls", ctl_mapping_list},     {"update", ctl_mapping_update},
        {"rm", ctl_mapping_rm},       {"remove", ctl_mapping_rm},
    };
    for (size_t i = 0; argc > 0 && i < sizeof(verbs) / sizeof(verbs[0]); i++) {
        if (strcmp(argv[0], verbs[i].verb) == 0)
            return verbs[i].fn(o, argc, argv);
    }
    fprintf(stderr, "portmux-ctl: usage: mapping add|list|update|rm ... (see portmux-ctl "
                    "--help)\n");
    return CTL_USAGE;
}

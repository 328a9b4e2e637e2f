/* Server configuration: YAML (libyaml events) -> struct config, with file:line:key errors.
 *
 * The loader walks libyaml's event stream with a table of known keys per mapping.
 * Every value is checked as it is read; the first problem stops the load with one line
 * "FILE:LINE: KEY: reason". Because any surprise is an error, the loader never has to
 * skip an unknown subtree, so input nesting cannot drive its recursion deeper than the
 * schema itself. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <libpq-fe.h>
#include <yaml.h>

#include "client_name.h"
#include "regular_file.h"
#include "token_text.h"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

/* Upper bounds that keep seconds*1000 and counts comfortably inside an int. */
#define CONFIG_MAX_SECONDS 86400
#define CONFIG_MAX_COUNT 1000000
/* A config file is a few KiB; refuse to slurp /dev/zero or a misplaced disk image. */
#define CONFIG_MAX_FILE (4 * 1024 * 1024)

/* Keys whose line is remembered for checks that involve more than one key. */
enum config_mark {
    MARK_NONE = 0,
    MARK_FROM,
    MARK_END,
    MARK_HB_INTERVAL,
    MARK_HB_TIMEOUT,
    MARK_CERT,
    MARK_KEY,
    MARK_CA,
    MARK_CLIENT_NAME,
    MARK_DB_PATH,
    MARK_DB_URL,
    MARK_COUNT
};

struct loader;
struct field;

/* Parses the value under the current event into base (struct config or an item). */
typedef int (*field_parse_fn)(struct loader *ld, const struct field *f, void *base);

struct field {
    const char *key;
    field_parse_fn parse;
    size_t off;                /* where the value lives in base */
    int min, max;              /* integer range */
    const struct field *sub;   /* keys of a nested mapping */
    enum config_mark mark;
};

struct loader {
    yaml_parser_t parser;
    yaml_event_t ev;
    bool have_ev;
    const char *name;          /* file name for messages */
    const char *input;         /* for locating reader errors */
    size_t input_len;
    char *err;
    size_t errlen;
    struct config *cfg;
    char path[256];            /* dotted key path of the value being read */
    size_t path_len;
    size_t lines[MARK_COUNT];  /* 1-based; 0 = not in the file */
    bool check_files;          /* open the TLS files named (a real config, not a test) */
};

/* ---- errors and paths ---- */

/* Replaces control characters so the message stays one printable line. */
static void sanitize_line(char *s)
{
    for (; *s != '\0'; s++) {
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            *s = '?';
    }
}

/* Writes "FILE:LINE: KEY: reason" and returns -1 for the caller to pass on. */
__attribute__((format(printf, 4, 5)))
static int fail_at(struct loader *ld, size_t line, const char *key, const char *fmt, ...)
{
    if (ld->err == NULL || ld->errlen == 0)
        return -1;
    int n = snprintf(ld->err, ld->errlen, "%s:%zu: %s: ", ld->name, line, key);
    if (n >= 0 && (size_t)n < ld->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ld->err + n, ld->errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    sanitize_line(ld->err);
    return -1;
}

static size_t ev_line(const struct loader *ld) { return ld->ev.start_mark.line + 1; }

static const char *path_or_root(const struct loader *ld)
{
    return ld->path_len > 0 ? ld->path : "(root)";
}

/* An error about the value under the current event, at the current path. */
#define fail(ld, ...) fail_at((ld), ev_line(ld), path_or_root(ld), __VA_ARGS__)

/* Appends fmt to the path; returns the old length for path_pop. */
__attribute__((format(printf, 2, 3)))
static size_t path_push(struct loader *ld, const char *fmt, ...)
{
    size_t old = ld->path_len;
    size_t room = sizeof(ld->path) - old;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(ld->path + old, room, fmt, ap);
    va_end(ap);
    ld->path_len = n < 0 ? old : (size_t)n >= room ? sizeof(ld->path) - 1 : old + (size_t)n;
    return old;
}

static void path_pop(struct loader *ld, size_t old)
{
    ld->path_len = old;
    ld->path[old] = '\0';
}

static size_t path_push_key(struct loader *ld, const char *key)
{
    return path_push(ld, "%s%s", ld->path_len > 0 ? "." : "", key);
}

/* ---- events ---- */

/* Line of a reader error: libyaml gives only a byte offset, so count newlines to it. */
static size_t reader_error_line(const struct loader *ld)
{
    size_t end = ld->parser.problem_offset;
    size_t line = 1;
    if (end > ld->input_len)
        end = ld->input_len;
    for (size_t i = 0; i < end; i++)
        line += ld->input[i] == '\n';
    return line;
}

static int syntax_error(struct loader *ld)
{
    const yaml_parser_t *p = &ld->parser;
    const char *problem = p->problem != NULL ? p->problem : "malformed YAML";
    if (p->error == YAML_MEMORY_ERROR)
        return fail_at(ld, p->mark.line + 1, "yaml", "out of memory");
    if (p->error == YAML_READER_ERROR)
        return fail_at(ld, reader_error_line(ld), "yaml", "syntax error: %s", problem);
    if (p->context != NULL)
        return fail_at(ld, p->problem_mark.line + 1, "yaml", "syntax error: %s (%s)", problem,
                       p->context);
    return fail_at(ld, p->problem_mark.line + 1, "yaml", "syntax error: %s", problem);
}

/* Advances to the next event. Aliases are refused here, once for every position:
 * they are never needed in a config and are the classic way to blow up a parser. */
static int next_event(struct loader *ld)
{
    if (ld->have_ev)
        yaml_event_delete(&ld->ev);
    ld->have_ev = false;
    if (!yaml_parser_parse(&ld->parser, &ld->ev))
        return syntax_error(ld);
    ld->have_ev = true;
    if (ld->ev.type == YAML_ALIAS_EVENT)
        return fail(ld, "aliases are not supported");
    return 0;
}

static bool ev_is_scalar(const struct loader *ld) { return ld->ev.type == YAML_SCALAR_EVENT; }

static const char *ev_text(const struct loader *ld)
{
    return (const char *)ld->ev.data.scalar.value;
}

static bool ev_is_plain(const struct loader *ld)
{
    return ev_is_scalar(ld) && ld->ev.data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
}

/* A plain empty, "~" or "null" scalar: YAML's way of writing "nothing here". */
static bool ev_is_null(const struct loader *ld)
{
    if (!ev_is_plain(ld))
        return false;
    const char *s = ev_text(ld);
    return s[0] == '\0' || strcmp(s, "~") == 0 || strcasecmp(s, "null") == 0;
}

static const char *ev_kind(const struct loader *ld)
{
    switch (ld->ev.type) {
    case YAML_MAPPING_START_EVENT: return "a mapping";
    case YAML_SEQUENCE_START_EVENT: return "a list";
    case YAML_SCALAR_EVENT: return ev_is_null(ld) ? "nothing" : "a string";
    default: return "something else";
    }
}

static void mark_line(struct loader *ld, const struct field *f)
{
    if (f->mark != MARK_NONE)
        ld->lines[f->mark] = ev_line(ld);
}

/* ---- scalars ---- */

/* Reads a plain decimal integer: no sign but '-', no leading zeros (YAML 1.1 would read
 * 010 as octal), no '_' or '0x'. Values too long to matter are reported as out of range. */
static int scalar_int(struct loader *ld, int min, int max, int *out)
{
    if (!ev_is_scalar(ld) || ev_is_null(ld))
        return fail(ld, "expected an integer, got %s", ev_kind(ld));
    const char *s = ev_text(ld);
    if (!ev_is_plain(ld))
        return fail(ld, "expected an integer, got a quoted string");
    bool neg = s[0] == '-';
    const char *d = s + neg;
    size_t n = strspn(d, "0123456789");
    if (n == 0 || d[n] != '\0' || (d[0] == '0' && n > 1) ||
        n != ld->ev.data.scalar.length - neg)
        return fail(ld, "expected an integer, got \"%.40s\"", s);
    long long v = 0;
    for (size_t i = 0; i < n && v <= INT_MAX; i++)
        v = v * 10 + (d[i] - '0');
    if (neg)
        v = -v;
    if (v < min || v > max)
        return fail(ld, "%.40s is out of range %d..%d", s, min, max);
    *out = (int)v;
    return 0;
}

static int scalar_bool(struct loader *ld, bool *out)
{
    static const char *const yes[] = {"true", "yes"};
    static const char *const no[] = {"false", "no"};
    if (ev_is_plain(ld) && !ev_is_null(ld)) {
        for (int i = 0; i < 2; i++) {
            if (strcasecmp(ev_text(ld), yes[i]) == 0 || strcasecmp(ev_text(ld), no[i]) == 0) {
                *out = strcasecmp(ev_text(ld), yes[i]) == 0;
                return 0;
            }
        }
    }
    if (!ev_is_scalar(ld) || ev_is_null(ld))
        return fail(ld, "expected true or false, got %s", ev_kind(ld));
    return fail(ld, "expected true or false, got \"%.40s\"", ev_text(ld));
}

/* Copies the scalar into *slot (freeing the old value); null becomes "". */
static int scalar_string(struct loader *ld, char **slot)
{
    if (!ev_is_scalar(ld))
        return fail(ld, "expected a string, got %s", ev_kind(ld));
    const char *s = ev_is_null(ld) ? "" : ev_text(ld);
    /* A quoted "\0" would silently cut the C string short. */
    if (!ev_is_null(ld) && strlen(s) != ld->ev.data.scalar.length)
        return fail(ld, "contains a NUL character");
    char *copy = strdup(s);
    if (copy == NULL)
        return fail(ld, "out of memory");
    free(*slot);
    *slot = copy;
    return 0;
}

#define FIELD_PTR(type, base, f) ((type *)(void *)((char *)(base) + (f)->off))

static int parse_int(struct loader *ld, const struct field *f, void *base)
{
    mark_line(ld, f);
    return scalar_int(ld, f->min, f->max, FIELD_PTR(int, base, f));
}

static int parse_bool(struct loader *ld, const struct field *f, void *base)
{
    return scalar_bool(ld, FIELD_PTR(bool, base, f));
}

/* Any string, "" included (an empty token means "no auth", an empty path "off"). */
static int parse_str(struct loader *ld, const struct field *f, void *base)
{
    mark_line(ld, f);
    return scalar_string(ld, FIELD_PTR(char *, base, f));
}

static int parse_nonempty(struct loader *ld, const struct field *f, void *base)
{
    if (parse_str(ld, f, base) != 0)
        return -1;
    const char *s = *FIELD_PTR(char *, base, f);
    if (s[0] == '\0')
        return fail(ld, "must not be empty");
    return 0;
}

static int parse_addr(struct loader *ld, const struct field *f, void *base)
{
    if (parse_str(ld, f, base) != 0)
        return -1;
    const char *s = *FIELD_PTR(char *, base, f);
    if (!netaddr_is_ip_literal(s) && !netaddr_is_hostname(s))
        return fail(ld, "not an IP address or host name: \"%.60s\"", s);
    return 0;
}

/* An address to bind: a literal, since a name could resolve to several or none. */
static int parse_ip(struct loader *ld, const struct field *f, void *base)
{
    if (parse_str(ld, f, base) != 0)
        return -1;
    const char *s = *FIELD_PTR(char *, base, f);
    if (!netaddr_is_ip_literal(s))
        return fail(ld, "not an IPv4 or IPv6 address: \"%.60s\"", s);
    return 0;
}

static int parse_level(struct loader *ld, const struct field *f, void *base)
{
    if (!ev_is_scalar(ld) || strlen(ev_text(ld)) != ld->ev.data.scalar.length ||
        log_level_parse(ev_text(ld), FIELD_PTR(enum log_level, base, f)) != 0)
        return fail(ld, "must be one of debug, info, warn, error");
    return 0;
}

/* ---- mappings ---- */

static const struct field *field_find(const struct field *fields, const struct loader *ld,
                                      size_t *idx)
{
    const char *key = ev_text(ld);
    if (strlen(key) != ld->ev.data.scalar.length)
        return NULL;
    for (size_t i = 0; fields[i].key != NULL; i++) {
        if (strcmp(fields[i].key, key) == 0) {
            *idx = i;
            return &fields[i];
        }
    }
    return NULL;
}

/* Reads key/value pairs after a MAPPING_START up to and including its MAPPING_END. */
static int parse_mapping_body(struct loader *ld, const struct field *fields, void *base)
{
    uint64_t seen = 0;
    for (;;) {
        if (next_event(ld) != 0)
            return -1;
        if (ld->ev.type == YAML_MAPPING_END_EVENT)
            return 0;
        if (!ev_is_scalar(ld))
            return fail_at(ld, ev_line(ld), path_or_root(ld), "keys must be strings");
        size_t idx = 0;
        const struct field *f = field_find(fields, ld, &idx);
        size_t old = path_push_key(ld, ev_text(ld));
        if (f == NULL)
            return fail(ld, "unknown key");
        if (seen & (UINT64_C(1) << idx))
            return fail(ld, "duplicate key");
        seen |= UINT64_C(1) << idx;
        if (next_event(ld) != 0 || f->parse(ld, f, base) != 0)
            return -1;
        path_pop(ld, old);
    }
}

/* A nested section; an empty one ("tunnel:" with every key commented out) is fine. */
static int parse_map(struct loader *ld, const struct field *f, void *base)
{
    if (ev_is_null(ld))
        return 0;
    if (ld->ev.type != YAML_MAPPING_START_EVENT)
        return fail(ld, "expected a mapping, got %s", ev_kind(ld));
    return parse_mapping_body(ld, f->sub, base);
}

/* ---- lists ---- */

/* A growing array of fixed-size, zero-initialised items. */
struct vec {
    void *items;
    size_t len, cap, size;
};

static void *vec_push(struct loader *ld, struct vec *v)
{
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 4;
        void *p = realloc(v->items, cap * v->size);
        if (p == NULL) {
            fail(ld, "out of memory");
            return NULL;
        }
        v->items = p;
        v->cap = cap;
    }
    void *slot = (char *)v->items + v->len++ * v->size;
    memset(slot, 0, v->size);
    return slot;
}

typedef int (*item_fn)(struct loader *ld, struct vec *v, size_t index);

/* Reads a list (null = empty) item by item, each under the path KEY[i]. */
static int parse_seq(struct loader *ld, item_fn fn, struct vec *v)
{
    if (ev_is_null(ld))
        return 0;
    if (ld->ev.type != YAML_SEQUENCE_START_EVENT)
        return fail(ld, "expected a list, got %s", ev_kind(ld));
    for (size_t i = 0;; i++) {
        if (next_event(ld) != 0)
            return -1;
        if (ld->ev.type == YAML_SEQUENCE_END_EVENT)
            return 0;
        size_t old = path_push(ld, "[%zu]", i);
        if (fn(ld, v, i) != 0)
            return -1;
        path_pop(ld, old);
    }
}

static int blacklist_item(struct loader *ld, struct vec *v, size_t index)
{
    int port = 0;
    if (scalar_int(ld, 1, 65535, &port) != 0)
        return -1;
    int *slot = vec_push(ld, v);
    if (slot == NULL)
        return -1;
    *slot = port;
    return 0;
}

static int parse_blacklist(struct loader *ld, const struct field *f, void *base)
{
    struct vec v = {.size = sizeof(int)};
    if (parse_seq(ld, blacklist_item, &v) != 0) {
        free(v.items);
        return -1;
    }
    free(ld->cfg->blacklist);
    ld->cfg->blacklist = v.items;
    ld->cfg->blacklist_len = v.len;
    return 0;
}

static int cidr_item(struct loader *ld, struct vec *v, size_t index)
{
    struct netaddr_cidr *slot = vec_push(ld, v);
    if (slot == NULL)
        return -1;
    if (!ev_is_scalar(ld) || ev_is_null(ld))
        return fail(ld, "expected a CIDR string, got %s", ev_kind(ld));
    if (strlen(ev_text(ld)) != ld->ev.data.scalar.length ||
        netaddr_cidr_parse(ev_text(ld), slot) != 0)
        return fail(ld, "invalid CIDR \"%.60s\"", ev_text(ld));
    return 0;
}

/* A CIDR list read with item into *list / *len, replacing what was there. */
static int parse_cidr_list(struct loader *ld, item_fn item,
                           struct netaddr_cidr **list, size_t *len)
{
    struct vec v = {.size = sizeof(struct netaddr_cidr)};
    if (parse_seq(ld, item, &v) != 0) {
        free(v.items);
        return -1;
    }
    free(*list);
    *list = v.items;
    *len = v.len;
    return 0;
}

static int parse_cidrs(struct loader *ld, const struct field *f, void *base)
{
    return parse_cidr_list(ld, cidr_item, &ld->cfg->allowed_ips, &ld->cfg->allowed_ips_len);
}

/* True when c is an IPv4-mapped IPv6 range (::ffff:0:0/96 and inside it); *v4prefix then
 * gets its prefix as an IPv4 one. */
static bool cidr_v4_mapped(const struct netaddr_cidr *c, int *v4prefix)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (c->family != AF_INET6 || c->prefix < 96 || memcmp(c->addr, mapped, 12) != 0)
        return false;
    *v4prefix = c->prefix - 96;
    return true;
}

/* A balancer's address or network. Short prefixes are refused: with 0.0.0.0/1 and
 * 128.0.0.0/1, say, anyone on the network could claim any source address with a header
 * of their own. The floor (an IPv4 /8, an IPv6 /16) still takes any real site. */
static int trusted_item(struct loader *ld, struct vec *v, size_t index)
{
    if (cidr_item(ld, v, index) != 0)
        return -1;
    const struct netaddr_cidr *c = (const struct netaddr_cidr *)v->items + v->len - 1;
    int v4prefix = c->prefix;
    bool v4 = c->family == AF_INET || cidr_v4_mapped(c, &v4prefix);
    if ((v4 && v4prefix < 8) || (!v4 && c->prefix < 16))
        return fail(ld, "\"%.60s\" trusts too many addresses (at most an IPv4 /8 or an "
                    "IPv6 /16): name the balancers (10.0.0.5, 10.0.0.0/24)", ev_text(ld));
    return 0;
}

bool config_trusts_loopback(const struct config *cfg)
{
    for (size_t i = 0; i < cfg->trusted_proxies_len; i++) {
        const struct netaddr_cidr *c = &cfg->trusted_proxies[i];
        int v4prefix;
        if (c->family == AF_INET || cidr_v4_mapped(c, &v4prefix)) {
            /* Prefixes of /8 and longer (trusted_item): inside 127/8 or apart from it. */
            if (c->addr[c->family == AF_INET ? 0 : 12] == 127)
                return true;
        } else {
            struct sockaddr_in6 lo = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
            if (netaddr_cidr_match(c, (const struct sockaddr *)&lo))
                return true;
        }
    }
    return false;
}

static int parse_trusted_proxies(struct loader *ld, const struct field *f, void *base)
{
    return parse_cidr_list(ld, trusted_item, &ld->cfg->trusted_proxies,
                           &ld->cfg->trusted_proxies_len);
}

/* A Host name the API answers to: a DNS name or an IP literal, kept in lower case because
 * the API compares Host headers case-insensitively against it. */
static int host_item(struct loader *ld, struct vec *v, size_t index)
{
    if (!ev_is_scalar(ld) || ev_is_null(ld))
        return fail(ld, "expected a host name, got %s", ev_kind(ld));
    const char *s = ev_text(ld);
    if (strlen(s) != ld->ev.data.scalar.length ||
        (!netaddr_is_hostname(s) && !netaddr_is_ip_literal(s)))
        return fail(ld, "not a host name or IP address: \"%.60s\" (no port, no scheme)", s);
    char **slot = vec_push(ld, v);
    if (slot == NULL)
        return -1;
    *slot = strdup(s);
    if (*slot == NULL)
        return fail(ld, "out of memory");
    for (char *c = *slot; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    return 0;
}

static void hosts_free(char **hosts, size_t len)
{
    for (size_t i = 0; i < len; i++)
        free(hosts[i]);
    free(hosts);
}

static int parse_hosts(struct loader *ld, const struct field *f, void *base)
{
    struct vec v = {.size = sizeof(char *)};
    if (parse_seq(ld, host_item, &v) != 0) {
        hosts_free(v.items, v.len);
        return -1;
    }
    hosts_free(ld->cfg->allowed_hosts, ld->cfg->allowed_hosts_len);
    ld->cfg->allowed_hosts = v.items;
    ld->cfg->allowed_hosts_len = v.len;
    return 0;
}

/* ---- tunnel.clients ---- */

/* Names follow the one rule of SPEC §4, so a config name can never differ from what a
 * Hello or the API may spell. */
static int parse_client_name(struct loader *ld, const struct field *f, void *base)
{
    if (parse_str(ld, f, base) != 0)
        return -1;
    if (!client_name_valid(*FIELD_PTR(char *, base, f)))
        return fail(ld, "must be 1-64 characters of A-Z a-z 0-9 . _ -");
    return 0;
}

/* A token with a space or control character in it (a newline a secret file ended with)
 * would never match what the peer sends. */
static int parse_token(struct loader *ld, const struct field *f, void *base)
{
    if (parse_str(ld, f, base) != 0)
        return -1;
    if (!token_text_ok(*FIELD_PTR(char *, base, f)))
        return fail(ld, "must be printable ASCII without spaces (a trailing newline?)");
    return 0;
}

/* A short token is guessable; "change-me" and friends are refused outright. */
static int parse_client_token(struct loader *ld, const struct field *f, void *base)
{
    if (parse_token(ld, f, base) != 0)
        return -1;
    if (strlen(*FIELD_PTR(char *, base, f)) < CLIENT_TOKEN_MIN_CONFIG)
        return fail(ld, "must be at least %d characters", CLIENT_TOKEN_MIN_CONFIG);
    return 0;
}

static const struct field client_fields[] = {
    {"name", parse_client_name, offsetof(struct config_client, name), 0, 0, NULL, MARK_CLIENT_NAME},
    {"token", parse_client_token, offsetof(struct config_client, token), 0, 0, NULL, MARK_NONE},
    {NULL, NULL, 0, 0, 0, NULL, MARK_NONE},
};

static void clients_free(struct config_client *clients, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        free(clients[i].name);
        free(clients[i].token);
    }
    free(clients);
}

/* Reports a key of the current item that the item lacks, at the item's first line. */
static int client_missing(struct loader *ld, size_t line, const char *key)
{
    path_push_key(ld, key);
    return fail_at(ld, line, ld->path, "missing (every client needs a name and a token)");
}

static int client_item(struct loader *ld, struct vec *v, size_t index)
{
    if (ld->ev.type != YAML_MAPPING_START_EVENT)
        return fail(ld, "expected a mapping with name and token, got %s", ev_kind(ld));
    size_t line = ev_line(ld);
    struct config_client *c = vec_push(ld, v);
    if (c == NULL)
        return -1;
    ld->lines[MARK_CLIENT_NAME] = 0;
    if (parse_mapping_body(ld, client_fields, c) != 0)
        return -1;
    if (c->name == NULL)
        return client_missing(ld, line, "name");
    if (c->token == NULL)
        return client_missing(ld, line, "token");
    const struct config_client *all = v->items;
    for (size_t i = 0; i < index; i++) {
        if (strcmp(all[i].name, c->name) == 0) {
            path_push_key(ld, "name");
            return fail_at(ld, ld->lines[MARK_CLIENT_NAME], ld->path,
                           "duplicate client name \"%.60s\"", c->name);
        }
    }
    return 0;
}

/* The list in the file replaces what was there: listing clients means "exactly these". */
static int parse_clients(struct loader *ld, const struct field *f, void *base)
{
    struct vec v = {.size = sizeof(struct config_client)};
    if (parse_seq(ld, client_item, &v) != 0) {
        clients_free(v.items, v.len);
        return -1;
    }
    clients_free(ld->cfg->clients, ld->cfg->clients_len);
    ld->cfg->clients = v.items;
    ld->cfg->clients_len = v.len;
    return 0;
}

/* ---- the schema (SPEC §5) ---- */

#define CFG_OFF(member) offsetof(struct config, member)
#define INT_KEY(k, m, lo, hi, mk) {k, parse_int, CFG_OFF(m), lo, hi, NULL, mk}
#define KEY(k, fn, m, mk) {k, fn, CFG_OFF(m), 0, 0, NULL, mk}
#define SECTION(k, sub) {k, parse_map, 0, 0, 0, sub, MARK_NONE}
#define END_KEYS {NULL, NULL, 0, 0, 0, NULL, MARK_NONE}

static const struct field port_range_fields[] = {
    INT_KEY("from", port_from, 1, 65535, MARK_FROM),
    INT_KEY("end", port_end, 1, 65535, MARK_END),
    KEY("blacklist", parse_blacklist, blacklist, MARK_NONE),
    END_KEYS,
};

static const struct field tls_fields[] = {
    KEY("cert_file", parse_str, tls_cert_file, MARK_CERT),
    KEY("key_file", parse_str, tls_key_file, MARK_KEY),
    KEY("client_ca", parse_str, tls_client_ca, MARK_CA),
    END_KEYS,
};

static const struct field tunnel_fields[] = {
    KEY("enabled", parse_bool, tunnel_enabled, MARK_NONE),
    KEY("listen_addr", parse_addr, tunnel_listen_addr, MARK_NONE),
    INT_KEY("listen_port", tunnel_listen_port, 0, 65535, MARK_NONE),
    KEY("clients", parse_clients, clients, MARK_NONE),
    SECTION("tls", tls_fields),
    INT_KEY("heartbeat_interval", heartbeat_interval, 1, CONFIG_MAX_SECONDS, MARK_HB_INTERVAL),
    INT_KEY("heartbeat_timeout", heartbeat_timeout, 1, CONFIG_MAX_SECONDS, MARK_HB_TIMEOUT),
    INT_KEY("connect_timeout", connect_timeout, 1, CONFIG_MAX_SECONDS, MARK_NONE),
    INT_KEY("hello_timeout", hello_timeout, 1, CONFIG_MAX_SECONDS, MARK_NONE),
    INT_KEY("max_streams_per_client", max_streams_per_client, 1, CONFIG_MAX_COUNT, MARK_NONE),
    /* At most 5 s: the new client waits for its HelloResponse through the probe, and gives
     * up after its own connect timeout (10 s by default), leaving the name to nobody. */
    INT_KEY("takeover_probe_ms", takeover_probe_ms, 1, 5000, MARK_NONE),
    INT_KEY("max_pending", tunnel_max_pending, 1, CONFIG_MAX_COUNT, MARK_NONE),
    INT_KEY("session_buffer_limit", session_buffer_limit, 0, INT_MAX, MARK_NONE),
    END_KEYS,
};

static const struct field api_fields[] = {
    /* Bound as it is, and compared with loopback for the token rule: a literal. */
    KEY("listen_addr", parse_ip, api_listen_addr, MARK_NONE),
    INT_KEY("listen_port", api_listen_port, 0, 65535, MARK_NONE),
    KEY("token", parse_token, api_token, MARK_NONE),
    KEY("allowed_ips", parse_cidrs, allowed_ips, MARK_NONE),
    KEY("allowed_hosts", parse_hosts, allowed_hosts, MARK_NONE),
    INT_KEY("max_connections", api_max_connections, 1, CONFIG_MAX_COUNT, MARK_NONE),
    INT_KEY("connection_timeout", api_connection_timeout, 1, CONFIG_MAX_SECONDS, MARK_NONE),
    END_KEYS,
};

static const struct field database_fields[] = {
    KEY("path", parse_nonempty, db_path, MARK_DB_PATH),
    KEY("url", parse_str, db_url, MARK_DB_URL),
    END_KEYS,
};

static const struct field mappings_fields[] = {
    KEY("bind_addr", parse_ip, mappings_bind_addr, MARK_NONE),
    END_KEYS,
};

static const struct field limits_fields[] = {
    INT_KEY("max_connections_per_mapping", max_connections_per_mapping, 1, CONFIG_MAX_COUNT,
            MARK_NONE),
    INT_KEY("idle_timeout", idle_timeout, 0, CONFIG_MAX_SECONDS, MARK_NONE),
    END_KEYS,
};

static const struct field log_fields[] = {
    KEY("level", parse_level, log_level, MARK_NONE),
    END_KEYS,
};

/* A node name is a key in the nodes table and a JSON key of every mapping's "nodes":
 * kept to the characters of a client name. "" = the host name. */
static int parse_node_name(struct loader *ld, const struct field *f, void *base)
{
    if (parse_str(ld, f, base) != 0)
        return -1;
    const char *s = *FIELD_PTR(char *, base, f);
    size_t n = strlen(s);
    if (n > 64 || strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") != n)
        return fail(ld, "must be at most 64 characters of A-Z a-z 0-9 . _ -");
    return 0;
}

static int parse_advertise(struct loader *ld, const struct field *f, void *base)
{
    if (parse_str(ld, f, base) != 0)
        return -1;
    if (strlen(*FIELD_PTR(char *, base, f)) > 255)
        return fail(ld, "must be at most 255 characters (host:port)");
    return 0;
}

/* SPEC §7, read only with database.url. */
static const struct field cluster_fields[] = {
    KEY("node_name", parse_node_name, cluster_node_name, MARK_NONE),
    KEY("advertise", parse_advertise, cluster_advertise, MARK_NONE),
    END_KEYS,
};

static const struct field root_fields[] = {
    SECTION("port_range", port_range_fields),
    SECTION("tunnel", tunnel_fields),
    SECTION("api", api_fields),
    SECTION("database", database_fields),
    SECTION("mappings", mappings_fields),
    SECTION("limits", limits_fields),
    SECTION("log", log_fields),
    SECTION("cluster", cluster_fields),
    KEY("trusted_proxies", parse_trusted_proxies, trusted_proxies, MARK_NONE),
    END_KEYS,
};

/* ---- checks across keys ---- */

/* Of two related keys, blames the one the file set last (the defaults are consistent,
 * so the file introduced the conflict); falls back to line 1 if neither came from it. */
static int fail_pair(struct loader *ld, enum config_mark a, const char *akey, enum config_mark b,
                     const char *bkey, const char *reason)
{
    bool blame_b = ld->lines[b] >= ld->lines[a];
    size_t line = blame_b ? ld->lines[b] : ld->lines[a];
    return fail_at(ld, line ? line : 1, blame_b ? bkey : akey, "%s", reason);
}

/* The TLS errors blame the key that is set: that is the line the operator has to fix. */
static int fail_mark(struct loader *ld, enum config_mark m, const char *key, const char *reason)
{
    return fail_at(ld, ld->lines[m] ? ld->lines[m] : 1, key, "%s", reason);
}

/* The same about a file: the reason, then the path the key names. */
static int fail_file(struct loader *ld, enum config_mark m, const char *key, const char *reason,
                     const char *path)
{
    return fail_at(ld, ld->lines[m] ? ld->lines[m] : 1, key, "%s (%.200s)", reason, path);
}

static int validate_tls(struct loader *ld)
{
    const struct config *c = ld->cfg;
    bool cert = c->tls_cert_file && c->tls_cert_file[0];
    bool key = c->tls_key_file && c->tls_key_file[0];
    bool ca = c->tls_client_ca && c->tls_client_ca[0];
    if (cert && !key)
        return fail_mark(ld, MARK_CERT, "tunnel.tls.cert_file", "set without tunnel.tls.key_file");
    if (key && !cert)
        return fail_mark(ld, MARK_KEY, "tunnel.tls.key_file", "set without tunnel.tls.cert_file");
    if (ca && !cert)
        return fail_mark(ld, MARK_CA, "tunnel.tls.client_ca",
                         "mutual TLS needs tunnel.tls.cert_file and key_file");
    return 0;
}

/* An encrypted key would make OpenSSL prompt on the terminal: refuse it instead. */
static int tls_no_password(char *buf, int size, int rwflag, void *u)
{
    return 0;
}

/* Opens a file named by a TLS key; a failure is reported as the shell would (errno). */
static FILE *tls_open(struct loader *ld, enum config_mark m, const char *key, const char *path)
{
    const char *why = NULL;
    int fd = regular_file_open(path, &why);
    FILE *f = fd >= 0 ? fdopen(fd, "r") : NULL;
    if (fd >= 0 && !f) {
        why = strerror(errno);
        close(fd);
    }
    if (!f)
        fail_file(ld, m, key, why, path);
    return f;
}

static X509 *tls_read_cert(struct loader *ld, enum config_mark m, const char *key,
                           const char *path)
{
    FILE *f = tls_open(ld, m, key, path);
    if (!f)
        return NULL;
    X509 *cert = PEM_read_X509(f, NULL, tls_no_password, NULL);
    fclose(f);
    if (!cert)
        fail_file(ld, m, key, "no PEM certificate in the file (malformed or not PEM)", path);
    return cert;
}

/* The TLS files must exist, be readable and hold what their key says, and the key must
 * belong to the certificate: a config error at start (exit 2, FILE:LINE: KEY), rather
 * than an OpenSSL error from deep inside the tunnel's start-up. */
static int check_tls_files(struct loader *ld)
{
    const struct config *c = ld->cfg;
    EVP_PKEY *pkey = NULL;
    X509 *ca = NULL;
    int rc = -1;
    X509 *cert = tls_read_cert(ld, MARK_CERT, "tunnel.tls.cert_file", c->tls_cert_file);
    if (!cert)
        goto out;
    FILE *f = tls_open(ld, MARK_KEY, "tunnel.tls.key_file", c->tls_key_file);
    if (!f)
        goto out;
    pkey = PEM_read_PrivateKey(f, NULL, tls_no_password, NULL);
    fclose(f);
    if (!pkey) {
        fail_file(ld, MARK_KEY, "tunnel.tls.key_file",
                  "no PEM private key in the file (malformed, not PEM, or encrypted)",
                  c->tls_key_file);
        goto out;
    }
    if (X509_check_private_key(cert, pkey) != 1) {
        fail_file(ld, MARK_KEY, "tunnel.tls.key_file",
                  "the key does not belong to tunnel.tls.cert_file", c->tls_key_file);
        goto out;
    }
    if (c->tls_client_ca[0] &&
        !(ca = tls_read_cert(ld, MARK_CA, "tunnel.tls.client_ca", c->tls_client_ca)))
        goto out;
    rc = 0;
out:
    X509_free(ca);
    EVP_PKEY_free(pkey);
    X509_free(cert);
    ERR_clear_error();
    return rc;
}

/* SPEC §7: SQLite (path) or PostgreSQL (url), never both; a url that is not a
 * PostgreSQL one would otherwise surface only as a connect error at start-up. */
static int validate_database(struct loader *ld)
{
    const struct config *c = ld->cfg;
    if (c->db_url[0] == '\0')
        return 0;
    if (ld->lines[MARK_DB_PATH])
        return fail_pair(ld, MARK_DB_PATH, "database.path", MARK_DB_URL, "database.url",
                         "database.path and database.url are both set; keep one");
    if (!config_db_url_ok(c->db_url))
        return fail_mark(ld, MARK_DB_URL, "database.url",
                         "must be a postgres:// or postgresql:// URL that libpq can parse "
                         "(check its percent-escapes, brackets and port)");
    return 0;
}

static int validate(struct loader *ld)
{
    const struct config *c = ld->cfg;
    char reason[128];
    if (c->port_from > c->port_end) {
        snprintf(reason, sizeof(reason), "port_range.from (%d) is above port_range.end (%d)",
                 c->port_from, c->port_end);
        return fail_pair(ld, MARK_FROM, "port_range.from", MARK_END, "port_range.end", reason);
    }
    if (c->heartbeat_timeout <= c->heartbeat_interval) {
        snprintf(reason, sizeof(reason),
                 "heartbeat_timeout (%d) must be greater than heartbeat_interval (%d)",
                 c->heartbeat_timeout, c->heartbeat_interval);
        return fail_pair(ld, MARK_HB_INTERVAL, "tunnel.heartbeat_interval", MARK_HB_TIMEOUT,
                         "tunnel.heartbeat_timeout", reason);
    }
    if (validate_database(ld) != 0)
        return -1;
    if (validate_tls(ld) != 0)
        return -1;
    if (ld->check_files && c->tunnel_enabled && c->tls_cert_file[0])
        return check_tls_files(ld);
    return 0;
}

/* ---- documents ---- */

/* stream-start, at most one document whose root is a mapping (or empty), stream-end. */
static int load_events(struct loader *ld)
{
    if (next_event(ld) != 0 || next_event(ld) != 0)
        return -1;
    if (ld->ev.type == YAML_STREAM_END_EVENT) {
        ld->cfg->empty_document = true; /* empty file, or only comments */
        return validate(ld);
    }
    if (next_event(ld) != 0)
        return -1;
    if (ld->ev.type == YAML_MAPPING_START_EVENT) {
        if (parse_mapping_body(ld, root_fields, ld->cfg) != 0)
            return -1;
    } else if (!ev_is_null(ld)) {
        return fail_at(ld, ev_line(ld), "(root)", "top level must be a mapping, got %s",
                       ev_kind(ld));
    } else {
        ld->cfg->empty_document = true;
    }
    if (next_event(ld) != 0 || next_event(ld) != 0) /* document-end, then what follows */
        return -1;
    if (ld->ev.type != YAML_STREAM_END_EVENT)
        return fail_at(ld, ev_line(ld), "yaml", "only one YAML document is allowed");
    return validate(ld);
}

static int config_load_mem(struct config *cfg, const char *yaml, size_t len, const char *name,
                           bool check_files, char *err, size_t errlen)
{
    struct loader ld;
    memset(&ld, 0, sizeof(ld));
    ld.check_files = check_files;
    ld.name = name != NULL ? name : "<string>";
    ld.input = yaml != NULL ? yaml : "";
    ld.input_len = yaml != NULL ? len : 0;
    ld.err = err;
    ld.errlen = errlen;
    ld.cfg = cfg;
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if (!yaml_parser_initialize(&ld.parser))
        return fail_at(&ld, 1, "yaml", "out of memory");
    yaml_parser_set_input_string(&ld.parser, (const unsigned char *)ld.input, ld.input_len);
    int rc = load_events(&ld);
    if (ld.have_ev)
        yaml_event_delete(&ld.ev);
    yaml_parser_delete(&ld.parser);
    return rc;
}

int config_load_string(struct config *cfg, const char *yaml, size_t len, const char *name,
                       char *err, size_t errlen)
{
    return config_load_mem(cfg, yaml, len, name, false, err, errlen);
}

/* Reads the whole file; returns 0, or -1 with *why set (a static message). */
static int read_whole_file(const char *path, char **out, size_t *outlen, const char **why)
{
    int fd = regular_file_open(path, why);
    if (fd < 0)
        return -1;
    int rc = 0;
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    if (buf == NULL)
        rc = ENOMEM;
    while (rc == 0) {
        if (len == cap) {
            /* Not realloc: the old block holds tokens and is wiped before it is freed. */
            char *p = cap < CONFIG_MAX_FILE ? malloc(cap * 2) : NULL;
            if (p == NULL) {
                rc = cap < CONFIG_MAX_FILE ? ENOMEM : EFBIG;
                break;
            }
            memcpy(p, buf, len);
            OPENSSL_cleanse(buf, cap);
            free(buf);
            buf = p;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n == 0)
            break;
        if (n < 0 && errno != EINTR)
            rc = errno;
        len += n > 0 ? (size_t)n : 0;
    }
    close(fd);
    if (rc != 0) {
        if (buf)
            OPENSSL_cleanse(buf, len);
        free(buf);
        *why = strerror(rc);
        return -1;
    }
    *out = buf;
    *outlen = len;
    return 0;
}

int config_load_file(struct config *cfg, const char *path, char *err, size_t errlen)
{
    char *buf = NULL;
    size_t len = 0;
    const char *why = NULL;
    if (read_whole_file(path, &buf, &len, &why) != 0) {
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "%s: cannot read: %s", path, why);
            sanitize_line(err);
        }
        return -1;
    }
    int rc = config_load_mem(cfg, buf, len, path, true, err, errlen);
    OPENSSL_cleanse(buf, len); /* tokens, and perhaps the database password */
    free(buf);
    return rc;
}

/* ---- defaults, queries, cleanup ---- */

int config_init_defaults(struct config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->port_from = 10000;
    cfg->port_end = 10100;
    cfg->tunnel_enabled = true;
    cfg->tunnel_listen_port = 9000;
    cfg->heartbeat_interval = 10;
    cfg->heartbeat_timeout = 30;
    cfg->connect_timeout = 10;
    cfg->hello_timeout = 10;
    cfg->max_streams_per_client = 10000;
    cfg->takeover_probe_ms = 2000;
    cfg->tunnel_max_pending = 128;
    cfg->session_buffer_limit = 64 * 1024 * 1024;
    cfg->api_listen_port = 8080;
    cfg->api_max_connections = 256;
    cfg->api_connection_timeout = 10;
    cfg->max_connections_per_mapping = 10000;
    cfg->log_level = LOGL_INFO;
    cfg->tunnel_listen_addr = strdup("0.0.0.0");
    cfg->tls_cert_file = strdup("");
    cfg->tls_key_file = strdup("");
    cfg->tls_client_ca = strdup("");
    cfg->api_listen_addr = strdup("127.0.0.1");
    cfg->api_token = strdup("");
    cfg->db_path = strdup("./data/mappings.db");
    cfg->db_url = strdup("");
    cfg->cluster_node_name = strdup("");
    cfg->cluster_advertise = strdup("");
    cfg->mappings_bind_addr = strdup("0.0.0.0");
    if (!cfg->tunnel_listen_addr || !cfg->tls_cert_file || !cfg->tls_key_file ||
        !cfg->tls_client_ca || !cfg->api_listen_addr || !cfg->api_token || !cfg->db_path ||
        !cfg->db_url || !cfg->mappings_bind_addr || !cfg->cluster_node_name ||
        !cfg->cluster_advertise) {
        config_free(cfg);
        return -1;
    }
    return 0;
}

bool config_db_url_ok(const char *url)
{
    if (strncmp(url, "postgres://", 11) != 0 && strncmp(url, "postgresql://", 13) != 0)
        return false;
    /* Parsed here, where the error can be told without the URL: libpq's own message
     * about a malformed one quotes it, password and all, and it would reach the log. */
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(url, &msg);
    bool ok = opts != NULL;
    /* libpq takes any port text here and fails only when it connects, which would make a
     * mistyped port look like a database that is down (exit 1, restarted for ever by a
     * supervisor) instead of a config error. Each port of a host list: 1-65535. */
    for (PQconninfoOption *o = opts; ok && o->keyword; o++) {
        if (strcmp(o->keyword, "port") != 0 || !o->val)
            continue;
        for (const char *p = o->val; ok && *p;) {
            char *end;
            errno = 0;
            long port = strtol(p, &end, 10);
            ok = end != p && errno == 0 && port >= 1 && port <= 65535 &&
                 (*end == '\0' || *end == ',');
            p = *end == ',' ? end + 1 : end;
        }
    }
    PQfreemem(msg);
    PQconninfoFree(opts);
    return ok;
}

bool config_port_allowed(const struct config *cfg, int port)
{
    if (port < cfg->port_from || port > cfg->port_end)
        return false;
    for (size_t i = 0; i < cfg->blacklist_len; i++) {
        if (cfg->blacklist[i] == port)
            return false;
    }
    return true;
}

void config_free(struct config *cfg)
{
    if (cfg == NULL)
        return;
    free(cfg->blacklist);
    clients_free(cfg->clients, cfg->clients_len);
    free(cfg->tunnel_listen_addr);
    free(cfg->tls_cert_file);
    free(cfg->tls_key_file);
    free(cfg->tls_client_ca);
    free(cfg->api_listen_addr);
    free(cfg->api_token);
    free(cfg->allowed_ips);
    free(cfg->trusted_proxies);
    hosts_free(cfg->allowed_hosts, cfg->allowed_hosts_len);
    free(cfg->db_path);
    free(cfg->db_url);
    free(cfg->cluster_node_name);
    free(cfg->cluster_advertise);
    free(cfg->mappings_bind_addr);
    /* Zeroed, a freed config is safe to free again. */
    memset(cfg, 0, sizeof(*cfg));
}

#include "mapping_request.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "client_name.h"
#include "clients.h"
#include "config.h"
#include "netaddr.h"

static const struct {
    const char *code;
    unsigned status;
} api_errors[] = {
    [API_OK] = {"ok", 200},
    [API_E_INVALID_JSON] = {"invalid_json", 400},
    [API_E_INVALID_FIELD] = {"invalid_field", 400},
    [API_E_PORT_OUT_OF_RANGE] = {"port_out_of_range", 400},
    [API_E_TUNNEL_DISABLED] = {"tunnel_disabled", 400},
    [API_E_UNAUTHORIZED] = {"unauthorized", 401},
    [API_E_FORBIDDEN] = {"forbidden", 403},
    [API_E_NOT_FOUND] = {"not_found", 404},
    [API_E_METHOD_NOT_ALLOWED] = {"method_not_allowed", 405},
    [API_E_PORT_IN_USE] = {"port_in_use", 409},
    [API_E_RANGE_EXHAUSTED] = {"range_exhausted", 409},
    [API_E_BODY_TOO_LARGE] = {"body_too_large", 413},
    [API_E_INTERNAL] = {"internal_error", 500},
    [API_E_CLIENT_EXISTS] = {"client_exists", 409},
    [API_E_MANAGED_BY_CONFIG] = {"managed_by_config", 409},
    [API_E_CROSS_ORIGIN] = {"cross_origin", 403},
    [API_E_BAD_HOST] = {"bad_host", 421},
    [API_E_STORE_UNAVAILABLE] = {"store_unavailable", 503},
};

const char *api_error_code(enum api_error e) { return api_errors[e].code; }

unsigned api_error_status(enum api_error e) { return api_errors[e].status; }

static const char *const create_fields[] = {
    "port", "target_ip", "target_port", "use_tunnel", "client", "name", "allow_from",
    "proxy_protocol", "max_connections", "rate_limit", "enabled", NULL};

const char *const mapping_request_proxy_names[3] = {"none", "v1", "v2"};

/* JSON integers only: "22", 22.0, 1e10 and true are refused (SPEC §3). */
static enum api_error field_int(json_t *obj, const char *key, int min, int max, bool required,
                                int *out, char *msg, size_t msglen)
{
    json_t *v = json_object_get(obj, key);
    if (!v) {
        if (!required)
            return API_OK;
        snprintf(msg, msglen, "%s is required", key);
        return API_E_INVALID_FIELD;
    }
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max) {
        snprintf(msg, msglen, "%s must be an integer from %d to %d", key, min, max);
        return API_E_INVALID_FIELD;
    }
    *out = (int)json_integer_value(v);
    return API_OK;
}

/* Counts UTF-8 code points; jansson already guarantees the bytes are valid UTF-8. */
static size_t utf8_chars(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        if (((unsigned char)*s & 0xC0) != 0x80)
            n++;
    return n;
}

static enum api_error field_label(json_t *obj, const char *key, bool allow_empty, char *out,
                                  size_t outlen, char *msg, size_t msglen)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return API_OK;
    const char *s = json_string_value(v);
    if (!json_is_string(v) || strlen(s) != json_string_length(v) ||
        utf8_chars(s) > STORE_NAME_MAX || strlen(s) >= outlen || (!allow_empty && !*s)) {
        snprintf(msg, msglen, "%s must be a string of %s to %d characters", key,
                 allow_empty ? "0" : "1", STORE_NAME_MAX);
        return API_E_INVALID_FIELD;
    }
    memcpy(out, s, strlen(s) + 1);
    return API_OK;
}

/* A tunnel client's name: the one rule of SPEC §4, as in a Hello and the config. */
static enum api_error field_client(json_t *obj, struct mapping_record *rec, char *msg,
                                   size_t msglen)
{
    json_t *v = json_object_get(obj, "client");
    if (!v)
        return API_OK;
    const char *s = json_string_value(v);
    if (!json_is_string(v) || strlen(s) != json_string_length(v) || !clients_name_valid(s)) {
        snprintf(msg, msglen, "client must be 1-64 characters of A-Z a-z 0-9 . _ -");
        return API_E_INVALID_FIELD;
    }
    memcpy(rec->client, s, strlen(s) + 1);
    return API_OK;
}

static enum api_error field_target_ip(json_t *obj, struct mapping_record *rec, char *msg,
                                      size_t msglen)
{
    json_t *v = json_object_get(obj, "target_ip");
    if (!v)
        return API_OK;
    const char *s = json_string_value(v);
    if (!json_is_string(v) || strlen(s) > STORE_HOST_MAX ||
        (!netaddr_is_ip_literal(s) && !netaddr_is_hostname(s))) {
        snprintf(msg, msglen, "target_ip must be an IPv4/IPv6 address or a host name");
        return API_E_INVALID_FIELD;
    }
    memcpy(rec->target_ip, s, strlen(s) + 1);
    return API_OK;
}

/* allow_from: an array of CIDRs, kept as text joined by ',' in the canonical form the
 * store keeps; each is parsed here so a bad one is refused with its index. */
static enum api_error field_allow_from(json_t *obj, struct mapping_record *rec, char *msg,
                                       size_t msglen)
{
    json_t *v = json_object_get(obj, "allow_from");
    if (!v)
        return API_OK;
    if (!json_is_array(v) || json_array_size(v) > STORE_ALLOW_MAX) {
        snprintf(msg, msglen, "allow_from must be an array of at most %d CIDR strings",
                 STORE_ALLOW_MAX);
        return API_E_INVALID_FIELD;
    }
    size_t i, used = 0;
    json_t *item;
    char text[STORE_ALLOW_BYTES + 1] = "";
    json_array_foreach(v, i, item) {
        const char *s = json_string_value(item);
        struct netaddr_cidr c;
        if (!s || strlen(s) != json_string_length(item) || strlen(s) >= STORE_CIDR_TEXT ||
            netaddr_cidr_parse(s, &c) != 0) {
            snprintf(msg, msglen, "allow_from[%zu] must be a CIDR such as 10.0.0.0/8 or ::1",
                     i);
            return API_E_INVALID_FIELD;
        }
        char canon[STORE_CIDR_TEXT];
        used += (size_t)snprintf(text + used, sizeof(text) - used, "%s%s", i ? "," : "",
                                 netaddr_cidr_format(&c, canon, sizeof(canon)));
    }
    memcpy(rec->allow_from, text, used + 1);
    return API_OK;
}

static enum api_error field_proxy_protocol(json_t *obj, struct mapping_record *rec, char *msg,
                                           size_t msglen)
{
    json_t *v = json_object_get(obj, "proxy_protocol");
    if (!v)
        return API_OK;
    for (int i = 0; i < 3; i++) {
        if (json_is_string(v) && strcmp(json_string_value(v), mapping_request_proxy_names[i]) == 0) {
            rec->proxy_protocol = i;
            return API_OK;
        }
    }
    snprintf(msg, msglen, "proxy_protocol must be \"none\", \"v1\" or \"v2\"");
    return API_E_INVALID_FIELD;
}

static enum api_error field_bool(json_t *obj, const char *key, bool *out, char *msg,
                                 size_t msglen)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return API_OK;
    if (!json_is_boolean(v)) {
        snprintf(msg, msglen, "%s must be true or false", key);
        return API_E_INVALID_FIELD;
    }
    *out = json_is_true(v);
    return API_OK;
}

static enum api_error field_rate_limit(json_t *obj, struct mapping_record *rec, char *msg,
                                       size_t msglen)
{
    json_t *v = json_object_get(obj, "rate_limit");
    if (!v)
        return API_OK;
    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
        json_integer_value(v) > STORE_RATE_LIMIT_MAX) {
        snprintf(msg, msglen, "rate_limit must be an integer from 0 to %lld (bytes/s)",
                 STORE_RATE_LIMIT_MAX);
        return API_E_INVALID_FIELD;
    }
    rec->rate_limit = (int64_t)json_integer_value(v);
    return API_OK;
}

static enum api_error parse_policy_fields(json_t *obj, struct mapping_record *rec, char *msg,
                                          size_t msglen)
{
    enum api_error e;
    if ((e = field_allow_from(obj, rec, msg, msglen)) != API_OK ||
        (e = field_proxy_protocol(obj, rec, msg, msglen)) != API_OK ||
        (e = field_int(obj, "max_connections", 1, STORE_MAX_CONNECTIONS, false,
                       &rec->max_connections, msg, msglen)) != API_OK ||
        (e = field_rate_limit(obj, rec, msg, msglen)) != API_OK)
        return e;
    return field_bool(obj, "enabled", &rec->enabled, msg, msglen);
}

static enum api_error check_unknown_fields(json_t *obj, char *msg, size_t msglen)
{
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        bool known = false;
        for (int i = 0; create_fields[i]; i++)
            known = known || strcmp(key, create_fields[i]) == 0;
        if (!known) {
            snprintf(msg, msglen, "unknown field \"%.64s\"", key);
            return API_E_INVALID_FIELD;
        }
    }
    return API_OK;
}

/* Names the field whose integer does not fit 64 bits: parsed again with integers as reals,
 * it is the one whose value lies beyond them. */
static const char *overflowing_key(const char *body, size_t len)
{
    static char key_copy[65];
    json_t *root = json_loadb(body, len, JSON_DECODE_INT_AS_REAL, NULL);
    const char *key, *found = NULL;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (!found && json_is_real(v) &&
            (json_real_value(v) >= 9.2e18 || json_real_value(v) <= -9.2e18))
            found = key;
    }
    snprintf(key_copy, sizeof(key_copy), "%s", found ? found : "a number");
    json_decref(root);
    return key_copy;
}

json_t *mapping_request_load_object(const char *body, size_t len, enum api_error *e, char *msg,
                           size_t msglen)
{
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    *e = API_E_INVALID_JSON;
    if (!root && json_error_code(&jerr) == json_error_numeric_overflow) {
        *e = API_E_INVALID_FIELD;
        snprintf(msg, msglen, "%s is out of range", overflowing_key(body, len));
        return NULL;
    }
    if (!root) {
        snprintf(msg, msglen, "body is not valid JSON: %s", jerr.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        snprintf(msg, msglen, "body must be a JSON object");
        return NULL;
    }
    *e = API_OK;
    return root;
}

/* Mode and the checks that need the config, after each field was parsed on its own. */
static enum api_error resolve_mode(const struct config *cfg, json_t *obj, bool update,
                                   struct mapping_record *rec, char *msg, size_t msglen)
{
    json_t *t = json_object_get(obj, "use_tunnel");
    if (t && !json_is_boolean(t)) {
        snprintf(msg, msglen, "use_tunnel must be true or false");
        return API_E_INVALID_FIELD;
    }
    if (t || !update)
        rec->use_tunnel = t ? json_is_true(t) : (!rec->target_ip[0] && cfg->tunnel_enabled);
    /* SPEC §2: a direct mapping has no client; "" in the API, the store and /metrics. A
     * mapping an update turns into a tunnel one without naming a client gets the default,
     * as a create does. */
    if (!rec->use_tunnel)
        rec->client[0] = '\0';
    else if (!rec->client[0])
        snprintf(rec->client, sizeof(rec->client), "%s", CLIENT_NAME_DEFAULT);
    /* Port 0 on create: the registry picks one inside the range. */
    if (!update && rec->port != 0 && !config_port_allowed(cfg, rec->port)) {
        snprintf(msg, msglen, "port %d is outside port_range %d-%d or blacklisted", rec->port,
                 cfg->port_from, cfg->port_end);
        return API_E_PORT_OUT_OF_RANGE;
    }
    if (rec->use_tunnel && !cfg->tunnel_enabled) {
        snprintf(msg, msglen, "use_tunnel needs tunnel.enabled: true in the config");
        return API_E_TUNNEL_DISABLED;
    }
    if (!rec->use_tunnel && !rec->target_ip[0]) {
        snprintf(msg, msglen, "target_ip is required in direct mode");
        return API_E_INVALID_FIELD;
    }
    /* Port omitted: target_port would default to the picked port, and a loopback target
     * would be this very listener. */
    if (!rec->use_tunnel && rec->port == 0 && rec->target_port == 0 &&
        netaddr_host_is_local(rec->target_ip)) {
        snprintf(msg, msglen, "target_port is required when port is omitted and target_ip "
                 "is this host");
        return API_E_INVALID_FIELD;
    }
    if (!rec->use_tunnel && rec->target_port == rec->port && netaddr_host_is_local(rec->target_ip)) {
        snprintf(msg, msglen,
                 "target_ip %s:%d is this server itself (port %d is one it listens on): "
                 "a forwarding loop",
                 rec->target_ip, rec->target_port, rec->port);
        return API_E_INVALID_FIELD;
    }
    return API_OK;
}

static enum api_error parse_common_fields(const struct config *cfg, json_t *obj, bool update,
                                          struct mapping_record *rec, char *msg, size_t msglen);

static enum api_error parse_create_fields(const struct config *cfg, json_t *obj,
                                          struct mapping_record *rec, char *msg, size_t msglen)
{
    enum api_error e;
    if ((e = check_unknown_fields(obj, msg, msglen)) != API_OK ||
        (e = field_int(obj, "port", 1, 65535, false, &rec->port, msg, msglen)) != API_OK)
        return e;
    rec->target_port = rec->port; /* 0 with an omitted port: the registry sets both */
    return parse_common_fields(cfg, obj, false, rec, msg, msglen);
}

/* Every field but port, shared by create and update (which starts from the stored
 * record, so an absent field keeps its value). */
static enum api_error parse_common_fields(const struct config *cfg, json_t *obj, bool update,
                                          struct mapping_record *rec, char *msg, size_t msglen)
{
    enum api_error e;
    if ((e = field_target_ip(obj, rec, msg, msglen)) != API_OK ||
        (e = field_int(obj, "target_port", 1, 65535, false, &rec->target_port, msg, msglen)) ||
        (e = field_client(obj, rec, msg, msglen)) != API_OK ||
        (e = field_label(obj, "name", true, rec->name, sizeof(rec->name), msg, msglen)) ||
        (e = parse_policy_fields(obj, rec, msg, msglen)) != API_OK)
        return e;
    return resolve_mode(cfg, obj, update, rec, msg, msglen);
}

enum api_error mapping_request_parse_create(const struct config *cfg, const char *body,
                                            size_t len, struct mapping_record *rec,
                                            char *msg, size_t msglen)
{
    memset(rec, 0, sizeof(*rec));
    strcpy(rec->client, CLIENT_NAME_DEFAULT);
    rec->enabled = true;
    enum api_error e;
    json_t *obj = mapping_request_load_object(body, len, &e, msg, msglen);
    if (!obj)
        return e;
    e = parse_create_fields(cfg, obj, rec, msg, msglen);
    json_decref(obj);
    return e;
}

enum api_error mapping_request_parse_remove(const char *body, size_t len, int *port,
                                            char *msg, size_t msglen)
{
    enum api_error e;
    json_t *obj = mapping_request_load_object(body, len, &e, msg, msglen);
    if (!obj)
        return e;
    e = API_OK;
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        if (strcmp(key, "port") != 0) {
            snprintf(msg, msglen, "unknown field \"%.64s\"", key);
            e = API_E_INVALID_FIELD;
        }
    }
    if (e == API_OK)
        e = field_int(obj, "port", 1, 65535, true, port, msg, msglen);
    json_decref(obj);
    return e;
}

/* The parts of a mapping an update body names: a write in a cluster stores those even
 * where this node's copy already holds the value (it may be behind another node's). */
static unsigned named_fields(json_t *obj)
{
    static const struct {
        const char *key;
        unsigned field;
    } parts[] = {
        {"target_ip", STORE_F_DEST}, {"target_port", STORE_F_DEST},
        {"use_tunnel", STORE_F_DEST}, {"client", STORE_F_DEST},
        {"name", STORE_F_NAME}, {"allow_from", STORE_F_ALLOW_FROM},
        {"proxy_protocol", STORE_F_PROXY_PROTOCOL},
        {"max_connections", STORE_F_MAX_CONNECTIONS}, {"rate_limit", STORE_F_RATE_LIMIT},
        {"enabled", STORE_F_ENABLED},
    };
    unsigned f = 0;
    for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++)
        if (json_object_get(obj, parts[i].key))
            f |= parts[i].field;
    return f;
}

enum api_error mapping_request_parse_update(const struct config *cfg, const char *body,
                                            size_t len, int *port, struct mapping_record *rec,
                                            unsigned *named, char *msg, size_t msglen)
{
    enum api_error e;
    json_t *obj = mapping_request_load_object(body, len, &e, msg, msglen);
    if (!obj)
        return e;
    if ((e = check_unknown_fields(obj, msg, msglen)) == API_OK &&
        (e = field_int(obj, "port", 1, 65535, true, port, msg, msglen)) == API_OK && rec) {
        if (rec->port != *port) {
            snprintf(msg, msglen, "port cannot change");
            e = API_E_INVALID_FIELD;
        } else {
            e = parse_common_fields(cfg, obj, true, rec, msg, msglen);
            if (named)
                *named = named_fields(obj);
        }
    }
    json_decref(obj);
    return e;
}

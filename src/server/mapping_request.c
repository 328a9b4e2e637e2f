#include "mapping_request.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

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
    [API_E_BODY_TOO_LARGE] = {"body_too_large", 413},
    [API_E_INTERNAL] = {"internal_error", 500},
};

const char *api_error_code(enum api_error e) { return api_errors[e].code; }

unsigned api_error_status(enum api_error e) { return api_errors[e].status; }

static const char *const create_fields[] = {"port", "target_ip", "target_port", "use_tunnel",
                                            "client", "name", NULL};

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

/* Returns the body's object, or NULL with *e set: a number beyond 64 bits is well-formed
 * JSON with a field out of range (invalid_field), anything else invalid_json. */
static json_t *load_object(const char *body, size_t len, enum api_error *e, char *msg,
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
    return root;
}

static bool is_loopback_name(const char *s)
{
    return strcmp(s, "127.0.0.1") == 0 || strcmp(s, "localhost") == 0 ||
           strcmp(s, "0.0.0.0") == 0 || strcmp(s, "::1") == 0 || strcmp(s, "::") == 0;
}

/* Mode and the checks that need the config, after each field was parsed on its own. */
static enum api_error resolve_mode(const struct config *cfg, json_t *obj,
                                   struct mapping_record *rec, char *msg, size_t msglen)
{
    json_t *t = json_object_get(obj, "use_tunnel");
    if (t && !json_is_boolean(t)) {
        snprintf(msg, msglen, "use_tunnel must be true or false");
        return API_E_INVALID_FIELD;
    }
    rec->use_tunnel = t ? json_is_true(t) : (!rec->target_ip[0] && cfg->tunnel_enabled);
    if (!config_port_allowed(cfg, rec->port)) {
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
    if (!rec->use_tunnel && rec->target_port == rec->port && is_loopback_name(rec->target_ip)) {
        snprintf(msg, msglen,
                 "target_ip %s:%d is this server itself (port %d is one it listens on): "
                 "a forwarding loop",
                 rec->target_ip, rec->target_port, rec->port);
        return API_E_INVALID_FIELD;
    }
    return API_OK;
}

static enum api_error parse_create_fields(const struct config *cfg, json_t *obj,
                                          struct mapping_record *rec, char *msg, size_t msglen)
{
    enum api_error e;
    if ((e = check_unknown_fields(obj, msg, msglen)) != API_OK ||
        (e = field_int(obj, "port", 1, 65535, true, &rec->port, msg, msglen)) != API_OK)
        return e;
    rec->target_port = rec->port;
    if ((e = field_target_ip(obj, rec, msg, msglen)) != API_OK ||
        (e = field_int(obj, "target_port", 1, 65535, false, &rec->target_port, msg, msglen)) ||
        (e = field_label(obj, "client", false, rec->client, sizeof(rec->client), msg,
                         msglen)) != API_OK ||
        (e = field_label(obj, "name", true, rec->name, sizeof(rec->name), msg, msglen)))
        return e;
    return resolve_mode(cfg, obj, rec, msg, msglen);
}

enum api_error mapping_request_parse_create(const struct config *cfg, const char *body,
                                            size_t len, struct mapping_record *rec,
                                            char *msg, size_t msglen)
{
    memset(rec, 0, sizeof(*rec));
    strcpy(rec->client, "default");
    enum api_error e;
    json_t *obj = load_object(body, len, &e, msg, msglen);
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
    json_t *obj = load_object(body, len, &e, msg, msglen);
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

/* Validation of API request bodies: JSON text -> mapping record or a precise error.
 * Pure (no sockets, no store), so it is unit-tested and fuzzed on its own. */
#ifndef PORTMUX_MAPPING_REQUEST_H
#define PORTMUX_MAPPING_REQUEST_H

#include <stddef.h>

#include "store.h"

struct config;
struct json_t;

/* API error codes of SPEC §3, with their HTTP status. */
enum api_error {
    API_OK = 0,
    API_E_INVALID_JSON,
    API_E_INVALID_FIELD,
    API_E_PORT_OUT_OF_RANGE,
    API_E_TUNNEL_DISABLED,
    API_E_UNAUTHORIZED,
    API_E_FORBIDDEN,
    API_E_NOT_FOUND,
    API_E_METHOD_NOT_ALLOWED,
    API_E_PORT_IN_USE,
    API_E_RANGE_EXHAUSTED,
    API_E_BODY_TOO_LARGE,
    API_E_INTERNAL,
    API_E_CLIENT_EXISTS,       /* §4a */
    API_E_MANAGED_BY_CONFIG,   /* §4a */
    API_E_CROSS_ORIGIN,    /* 403: a foreign Origin or Sec-Fetch-Site: cross-site */
    API_E_BAD_HOST,        /* 421: a Host the API does not answer to (DNS rebinding) */
    API_E_STORE_UNAVAILABLE, /* 503: the database did not take the write in time (§7) */
};

/* "invalid_json", ... */
const char *api_error_code(enum api_error e);
/* 400, 401, ... */
unsigned api_error_status(enum api_error e);

/* Parses a create body into rec, applying SPEC §2 defaults and checks against cfg.
 * On failure returns the error and writes a message naming the field into msg. */
enum api_error mapping_request_parse_create(const struct config *cfg, const char *body,
                                            size_t len, struct mapping_record *rec,
                                            char *msg, size_t msglen);

/* Names of proxy_protocol values, indexed by mapping_record.proxy_protocol. */
extern const char *const mapping_request_proxy_names[3];

/* Parses an update body {"port": n, <fields>}. Called first with rec NULL, it only checks
 * the body and reads *port (to find the mapping); called again with the stored record in
 * rec, it applies the given fields onto it and validates the result as create does, and
 * sets *named (when not NULL) to the parts (enum store_field) the body names. */
enum api_error mapping_request_parse_update(const struct config *cfg, const char *body,
                                            size_t len, int *port, struct mapping_record *rec,
                                            unsigned *named, char *msg, size_t msglen);

/* Loads a request body that must be one JSON object (duplicate keys refused). NULL with
 * *e and msg set: a number beyond 64 bits is well-formed JSON with a field out of range
 * (invalid_field), anything else invalid_json with jansson's reason. New reference. */
struct json_t *mapping_request_load_object(const char *body, size_t len, enum api_error *e,
                                    char *msg, size_t msglen);

/* Parses a remove body {"port": n}. */
enum api_error mapping_request_parse_remove(const char *body, size_t len, int *port,
                                            char *msg, size_t msglen);

#endif

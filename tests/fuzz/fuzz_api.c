/* Fuzz target: API request validation (body -> mapping record or a precise error). Both
 * parsers must return a known error code and, on success, a record inside its ranges. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "mapping_request.h"

static struct config fuzz_cfg;
static int fuzz_cfg_ready;

static void fuzz_check_record(const struct mapping_record *r, int auto_port_ok)
{
    /* Port omitted on create: 0 for the registry to pick, target_port with it unless set. */
    if (auto_port_ok && r->port == 0) {
        if (r->target_port < 0 || r->target_port > 65535)
            abort();
    } else if (r->port < 1 || r->port > 65535 || r->target_port < 1 ||
               r->target_port > 65535) {
        abort();
    }
    if (memchr(r->allow_from, 0, sizeof(r->allow_from)) == NULL || r->proxy_protocol < 0 ||
        r->proxy_protocol > 2 || r->max_connections < 0 ||
        r->max_connections > STORE_MAX_CONNECTIONS || r->rate_limit < 0 ||
        r->rate_limit > STORE_RATE_LIMIT_MAX)
        abort();
    if (memchr(r->name, 0, sizeof(r->name)) == NULL ||
        memchr(r->client, 0, sizeof(r->client)) == NULL ||
        memchr(r->target_ip, 0, sizeof(r->target_ip)) == NULL)
        abort();
    if (r->port != 0 && !config_port_allowed(&fuzz_cfg, r->port))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!fuzz_cfg_ready) {
        config_init_defaults(&fuzz_cfg);
        fuzz_cfg_ready = 1;
    }
    struct mapping_record rec;
    char msg[256];
    enum api_error e = mapping_request_parse_create(&fuzz_cfg, (const char *)data, size, &rec,
                                                    msg, sizeof(msg));
    if (e == API_OK)
        fuzz_check_record(&rec, 1);
    else if (api_error_status(e) < 400 || !msg[0])
        abort();
    /* Update: the body applied onto a stored record (one on the port it names). */
    int uport = 0;
    e = mapping_request_parse_update(&fuzz_cfg, (const char *)data, size, &uport, NULL, NULL,
                                     msg, sizeof(msg));
    if (e == API_OK) {
        struct mapping_record cur;
        memset(&cur, 0, sizeof(cur));
        cur.port = cur.target_port = uport;
        strcpy(cur.target_ip, "127.0.0.1");
        cur.enabled = 1;
        unsigned named = 0;
        e = mapping_request_parse_update(&fuzz_cfg, (const char *)data, size, &uport, &cur,
                                         &named, msg, sizeof(msg));
        if (e == API_OK && (cur.port != uport || cur.target_port < 1 ||
                            memchr(cur.allow_from, 0, sizeof(cur.allow_from)) == NULL ||
                            (named & ~(unsigned)STORE_F_ALL) != 0))
            abort();
    }
    if (e != API_OK && (api_error_status(e) < 400 || !msg[0]))
        abort();
    int port = 0;
    e = mapping_request_parse_remove((const char *)data, size, &port, msg, sizeof(msg));
    if (e == API_OK && (port < 1 || port > 65535))
        abort();
    return 0;
}

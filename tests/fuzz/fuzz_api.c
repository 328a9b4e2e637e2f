/* Fuzz target: API request validation (body -> mapping record or a precise error). Both
 * parsers must return a known error code and, on success, a record inside its ranges. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "mapping_request.h"

static struct config fuzz_cfg;
static int fuzz_cfg_ready;

static void fuzz_check_record(const struct mapping_record *r)
{
    if (r->port < 1 || r->port > 65535 || r->target_port < 1 || r->target_port > 65535)
        abort();
    if (memchr(r->name, 0, sizeof(r->name)) == NULL ||
        memchr(r->client, 0, sizeof(r->client)) == NULL ||
        memchr(r->target_ip, 0, sizeof(r->target_ip)) == NULL)
        abort();
    if (!config_port_allowed(&fuzz_cfg, r->port))
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
        fuzz_check_record(&rec);
    else if (api_error_status(e) < 400 || !msg[0])
        abort();
    int port = 0;
    e = mapping_request_parse_remove((const char *)data, size, &port, msg, sizeof(msg));
    if (e == API_OK && (port < 1 || port > 65535))
        abort();
    return 0;
}

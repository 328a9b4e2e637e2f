/* libFuzzer target for the config loader: any bytes must give either a config that obeys
 * every documented rule, or -1 with one line "fuzz.yaml:LINE: KEY: reason". Anything else
 * (a crash, a leak, a broken invariant) is a loader bug, so it aborts. */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fuzz_fail(const char *what)
{
    fprintf(stderr, "fuzz_config: %s\n", what);
    abort();
}

/* The rules SPEC §5 and config.h promise about a loaded config. */
static void fuzz_check_loaded(const struct config *c)
{
    if (c->port_from < 1 || c->port_end > 65535 || c->port_from > c->port_end)
        fuzz_fail("port_range out of bounds");
    if (c->heartbeat_interval < 1 || c->heartbeat_timeout <= c->heartbeat_interval)
        fuzz_fail("heartbeat rule broken");
    if (!c->tunnel_listen_addr || !c->api_listen_addr || !c->api_token || !c->db_path ||
        !c->tls_cert_file || !c->tls_key_file || !c->tls_client_ca)
        fuzz_fail("string left NULL");
    if ((c->tls_cert_file[0] == '\0') != (c->tls_key_file[0] == '\0'))
        fuzz_fail("half a TLS key pair accepted");
    for (size_t i = 0; i < c->clients_len; i++) {
        if (!c->clients[i].name || !c->clients[i].name[0] || !c->clients[i].token ||
            !c->clients[i].token[0])
            fuzz_fail("client without name or token");
    }
    for (size_t i = 0; i < c->blacklist_len; i++) {
        if (c->blacklist[i] < 1 || c->blacklist[i] > 65535)
            fuzz_fail("blacklisted port out of range");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct config cfg;
    char err[256];
    if (config_init_defaults(&cfg) != 0)
        return 0;
    int rc = config_load_string(&cfg, (const char *)data, size, "fuzz.yaml", err, sizeof(err));
    if (rc == 0)
        fuzz_check_loaded(&cfg);
    else if (strncmp(err, "fuzz.yaml:", 10) != 0 || strchr(err, '\n') != NULL)
        fuzz_fail("error message is not one \"FILE:LINE: KEY: reason\" line");
    config_free(&cfg);
    return 0;
}

/* Unit tests for the registry's view of connected tunnel clients (src/server/mapping.c):
 * the tunnel tells it when a client's session comes and goes, and mapping_status() of a
 * tunnel mapping answers from that, with "" meaning the default client. */
#include "check.h"
#include "mapping.h"
#include "server.h"

#include <string.h>

int main(void)
{
    struct server srv;
    memset(&srv, 0, sizeof(srv));
    struct mapping_registry *reg = mapping_registry_new(&srv);
    CHECK(reg != NULL);
    if (!reg)
        return check_summary();

    CHECK(!mapping_registry_client_is_up(reg, "office"));
    mapping_registry_client_up(reg, "office");
    CHECK(mapping_registry_client_is_up(reg, "office"));
    CHECK(!mapping_registry_client_is_up(reg, "lab"));

    /* A takeover: the new session's up may come before the old one's down. */
    mapping_registry_client_up(reg, "office");
    mapping_registry_client_down(reg, "office");
    CHECK(mapping_registry_client_is_up(reg, "office"));
    mapping_registry_client_down(reg, "office");
    CHECK(!mapping_registry_client_is_up(reg, "office"));

    /* A down without an up (a session the registry never heard of) changes nothing. */
    mapping_registry_client_down(reg, "office");
    CHECK(!mapping_registry_client_is_up(reg, "office"));

    /* A mapping that names no client means "default". */
    CHECK(!mapping_registry_client_is_up(reg, ""));
    mapping_registry_client_up(reg, "default");
    CHECK(mapping_registry_client_is_up(reg, ""));
    CHECK(mapping_registry_client_is_up(reg, NULL));

    /* Freed with names still up (the tunnel outlives the registry at shutdown). */
    mapping_registry_client_up(reg, "lab");
    mapping_registry_free(reg);
    return check_summary();
}

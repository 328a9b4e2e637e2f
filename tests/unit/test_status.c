/* The client's status table: rows a dial holds must outlive a new HelloResponse. A cluster
 * node session's dial keeps a pointer to its target's row while it waits; the --server
 * session reconnecting replaces the announced mappings (status_mappings_clear) meanwhile.
 * The row used to be freed there, and the dial then wrote into freed memory (caught by the
 * ASan pass of the unit tests). */
#include <event2/event.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "status.h"

static void test_clear_keeps_rows_a_dial_holds(void)
{
    struct event_base *base = event_base_new();
    int p[2];
    CHECK(pipe(p) == 0);
    struct status_opts o = {.server_host = "127.0.0.1", .server_port = 9000, .name = "edge",
                            .out_fd = p[1]};
    struct status *s = status_new(base, &o);
    CHECK(s != NULL);
    status_mapping_add(s, 10022, "127.0.0.1:22");
    /* A dial to a target no mapping announced yet (a node's ConnectRequest). */
    struct status_target *held = status_target_get(s, "10.0.0.7:5432");
    CHECK(held != NULL);
    status_mappings_clear(s);
    status_mapping_add(s, 10022, "127.0.0.1:22");
    /* The dial ends: it counts into its row, which is still the same one. */
    status_target_failed(held, "timed out");
    status_target_opened(held);
    status_target_bytes(held, 100, 200);
    status_target_closed(held);
    CHECK(status_target_get(s, "10.0.0.7:5432") == held);
    /* Many reconnects with rows held: bounded (rows past the bound share one). */
    for (int i = 0; i < 1000; i++) {
        char name[32];
        snprintf(name, sizeof(name), "10.1.%d.%d:80", i / 250, i % 250);
        CHECK(status_target_get(s, name) != NULL);
        status_mappings_clear(s);
    }
    status_free(s);
    close(p[0]);
    close(p[1]);
    event_base_free(base);
}

int main(void)
{
    test_clear_keeps_rows_a_dial_holds();
    return check_summary();
}

/* The live registry of mappings: one listener per mapping, its status and counters,
 * create/remove/restore against the store. Owns struct mapping. */
#ifndef PORTMUX_MAPPING_H
#define PORTMUX_MAPPING_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <time.h>

#include <event2/util.h>
#include <sys/socket.h>

#include "mapping_policy.h"
#include "mapping_types.h"
#include "netaddr.h"
#include "store.h"
#include "token_bucket.h"

struct mapping_registry;

/* Where the registry sends an accepted public connection (fd owned by the handler):
 * direct mode to forward.c, tunnel mode to the tunnel. Set by main.c, so the registry
 * includes neither relay. */
struct mapping_handlers {
    void (*direct)(struct mapping *m, evutil_socket_t fd);
    void (*tunnel)(void *ctx, struct mapping *m, evutil_socket_t fd); /* NULL: tunnel off */
    void *tunnel_ctx;
    /* The create-time loop check (loop_guard_check_create), run again on the port the
     * registry picks for a create without one: true when rec, with that port, would be
     * its own target. NULL: not checked. */
    bool (*targets_self)(struct server *srv, const struct mapping_record *rec);
};

/* Counts a new connection (active, total) and links it for abort. Inside the mapping's
 * accept callback it also records the peer's address. */
void mapping_conn_begin(struct mapping *m, struct mapping_conn *mc,
                        void (*abort)(struct mapping_conn *mc));
/* Unlinks it; counts it failed when it never reached its target. Logs (debug) its bytes
 * and duration. */
void mapping_conn_end(struct mapping_conn *mc, bool failed);
/* Counts bytes relayed by the connection, into it and its mapping. */
static inline void mapping_conn_add_bytes(struct mapping_conn *mc, uint64_t in, uint64_t out);

static inline void mapping_conn_add_bytes(struct mapping_conn *mc, uint64_t in, uint64_t out)
{
    mc->bytes_in += in;
    mc->bytes_out += out;
    mc->mapping->stats.bytes_in += in;
    mc->mapping->stats.bytes_out += out;
}

/* True when an accepted fd lies in the last MAPPING_FD_RESERVE (64) descriptors, or the
 * last quarter of a smaller limit, kept for the API and the store: public connections
 * (mappings and the tunnel port) are refused there. */
bool mapping_fd_in_reserve(evutil_socket_t fd);

/* mapping_max_connections and mapping_conn_proxy_header: see mapping_policy.h. */

/* Effective target host: rec.target_ip, or 127.0.0.1 in tunnel mode when empty. */
const char *mapping_target_host(const struct mapping *m);

enum mapping_status mapping_status(const struct mapping *m);
const char *mapping_status_name(enum mapping_status s);

/* Registry. */
struct mapping_registry *mapping_registry_new(struct server *srv);
/* Closes every listener and live connection, frees all. NULL-safe. */
void mapping_registry_free(struct mapping_registry *reg);
/* Sets where accepted connections go (copied). Until then, every one is refused. */
void mapping_registry_set_handlers(struct mapping_registry *reg,
                                   const struct mapping_handlers *h);
/* The tunnel tells the registry that client name's session is up (Hello accepted) or
 * gone; mapping_status() answers from this, without asking the tunnel. */
void mapping_registry_client_up(struct mapping_registry *reg, const char *name);
void mapping_registry_client_down(struct mapping_registry *reg, const char *name);
/* Whether client name ("" = "default") has a live session. */
bool mapping_registry_client_is_up(const struct mapping_registry *reg, const char *name);
/* Loads every stored mapping and binds it; a port that cannot be bound stays with status
 * error. Returns 0, or -1 when the store could not be read. */
int mapping_registry_restore(struct mapping_registry *reg);
struct mapping *mapping_registry_find(struct mapping_registry *reg, int port);
size_t mapping_registry_count(struct mapping_registry *reg);
/* Iteration for list and metrics, in port order of creation. */
struct mapping *mapping_registry_first(struct mapping_registry *reg);
struct mapping *mapping_registry_next(struct mapping *m);

enum mapping_result {
    MAPPING_OK = 0,
    MAPPING_E_IN_USE = -1,     /* already mapped, or the OS refused the bind */
    MAPPING_E_STORE = -2,      /* database error */
    MAPPING_E_NOT_FOUND = -3,
    MAPPING_E_EXHAUSTED = -4,  /* port 0 asked for and no port of the range is free */
    MAPPING_E_UNAVAILABLE = -5,/* the database did not answer in time (§7); nothing changed */
    MAPPING_E_BUSY = -6,       /* a write for this mapping is in flight: try again */
    MAPPING_E_RESOURCES = -7,  /* no descriptor (or memory) for a listener: not the port's
                                * fault, and no other port of the range would do better */
};

/* ---- asynchronous create, update and remove (SPEC §7: nothing waits on the database) ----
 * Each checks and binds at once, marks the port busy, sends the store write, and finishes
 * when the store answers: done runs exactly once with the result, the live mapping on
 * success (else NULL) and a human reason on failure. With SQLite the store answers before
 * the call returns, so done runs before it returns too. Meanwhile a second create on that
 * port answers MAPPING_E_IN_USE, an update or remove MAPPING_E_BUSY; a mapping being
 * created is not listed yet and not found by mapping_registry_find. */
typedef void (*mapping_done_fn)(enum mapping_result r, struct mapping *m, const char *err,
                                void *arg);


/* Binds rec.port (rec.port 0: the lowest free port of the range, not blacklisted, not
 * mapped and bindable; MAPPING_E_EXHAUSTED when there is none), then stores rec; on any failure neither remains. A stored mapping on the
 * same port in status error is retried: on a successful bind it is replaced by rec.
 * The reason and the live mapping go to done. */
void mapping_registry_create_async(struct mapping_registry *reg,
                                   const struct mapping_record *rec, mapping_done_fn done,
                                   void *arg);
/* Changes the mapping on rec->port to rec (every field but id, port and created_at, which
 * are kept): stored first, then applied. The listener stays open through it; enabled
 * false closes it and every live connection, enabled true opens it again (a failed bind
 * of a disabled mapping changes nothing: MAPPING_E_IN_USE). allow_from, max_connections
 * and rate_limit apply to live connections at once once stored. named: the parts (enum
 * store_field) the request named, stored even where they equal this node's copy. */
void mapping_registry_update_async(struct mapping_registry *reg,
                                   const struct mapping_record *rec, unsigned named,
                                   mapping_done_fn done, void *arg);

/* Deletes from the store, then closes the listener and every live connection (done gets
 * m NULL: it is gone). */
void mapping_registry_remove_async(struct mapping_registry *reg, int port,
                                   mapping_done_fn done, void *arg);

/* The mapping as the API shows it: api_json_mapping() in api_json.h. */

/* Failed dials (issue 17): the last reason and its time (m->dial, shown by api_json.c),
 * and an info line per mapping at most every MAPPING_DIAL_LOG_SECONDS. */
#define MAPPING_DIAL_LOG_SECONDS 10

/* Records why a public connection of m never reached its target: a dead target, a
 * timeout, the client's refusal, no client. The reason is formatted into a fixed buffer
 * (longer ones are cut), so a peer cannot grow the line or the memory. */
void mapping_dial_failed(struct mapping *m, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* SPEC §7: brings the live mapping on rec->port in line with rec, a row another node
 * stored (bind, rebind, policy, enable/disable), without writing to the store. A port
 * that cannot be bound stays with status error. Returns true when anything changed. */
bool mapping_registry_apply(struct mapping_registry *reg, const struct mapping_record *rec);
/* Closes and drops the mapping on port (removed by another node), without the store.
 * Returns true when there was one. */
bool mapping_registry_forget(struct mapping_registry *reg, int port);
/* True while a write of this node's for port is in flight (create, update, remove): apply
 * and forget leave that port alone until its answer, so whoever reads the shared table
 * must read it again after the write. */
bool mapping_registry_writing(struct mapping_registry *reg, int port);

#endif

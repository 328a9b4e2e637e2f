/* Mapping persistence. The server talks to this interface only, so a PostgreSQL backend
 * can sit beside SQLite later (store_open picks the backend from the location string). */
#ifndef PORTMUX_STORE_H
#define PORTMUX_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The records, limits and result codes (types only, shared with store_backend.h). */
#include "store_types.h"

struct store;

/* Opens (creating when missing, with parent directory) the store at location: a file path
 * for SQLite. Applies pending migrations in one transaction. On failure returns NULL,
 * *result says why (STORE_TOO_NEW for a newer schema), err holds a one-line message. */
struct store *store_open(const char *location, enum store_result *result, char *err,
                         size_t errlen);

/* Closes the store cleanly. NULL-safe. */
void store_close(struct store *st);

/* The schema version the store is at after open. */
int store_schema_version(struct store *st);

/* How many migrations store_open applied (0 on a second start). */
int store_migrations_applied(struct store *st);

/* How many writes (mappings and clients) this process made through st successfully. The cluster sync (cluster_sync.h) discards a read that a local write may
 * have overtaken. */
uint64_t store_write_count(const struct store *st);

/* Installs ok, asked before every write: false means the database is known to be away
 * (the cluster's change feed saw it stall or drop), and the write answers
 * STORE_UNAVAILABLE at once instead of waiting on the loop for a timeout. */
void store_set_gate(struct store *st, bool (*ok)(void *arg), void *arg);

/* True when st is shared by several nodes (PostgreSQL, SPEC §7). */
bool store_is_shared(const struct store *st);

/* Inserts rec (durable when it returns STORE_OK); fills rec->id and rec->created_at. */
enum store_result store_mapping_insert(struct store *st, struct mapping_record *rec);

/* Replaces the stored mapping on rec->port with rec in one transaction (keeps nothing of
 * the old row); fills rec->id and rec->created_at. STORE_NOT_FOUND when none is stored. */
enum store_result store_mapping_replace(struct store *st, struct mapping_record *rec);

/* Changes every field of the stored mapping on rec->port but id and created_at (one
 * statement, durable when it returns STORE_OK). STORE_NOT_FOUND when none is stored. */
enum store_result store_mapping_update(struct store *st, const struct mapping_record *rec);

/* Deletes the mapping on port. STORE_NOT_FOUND when there is none. */
enum store_result store_mapping_delete(struct store *st, int port);

/* Calls fn for each stored mapping in port order; stops early when fn returns non-zero. */
enum store_result store_mapping_foreach(struct store *st,
                                        int (*fn)(const struct mapping_record *rec, void *arg),
                                        void *arg);

/* ---- tunnel clients (SPEC §4a) ----
 * Only clients created through the API are stored; the store never sees a token, only
 * the hash the client registry (clients.h) computes, as lowercase hex. */

/* Inserts rec (durable on STORE_OK); fills rec->created_at. STORE_DUPLICATE when the name
 * is stored already. */
enum store_result store_client_insert(struct store *st, struct client_record *rec);

/* Updates the hashes, grace period and last_seen of the client named rec->name in one
 * transaction. STORE_NOT_FOUND when none is stored. */
enum store_result store_client_update(struct store *st, const struct client_record *rec);

/* Deletes the client named name. STORE_NOT_FOUND when there is none. */
enum store_result store_client_delete(struct store *st, const char *name);

/* Reads the client named name into *rec. STORE_NOT_FOUND when there is none. */
enum store_result store_client_get(struct store *st, const char *name,
                                   struct client_record *rec);

/* Calls fn for each stored client in name order; stops early when fn returns non-zero. */
enum store_result store_client_foreach(struct store *st,
                                       int (*fn)(const struct client_record *rec, void *arg),
                                       void *arg);

/* ---- settings: facts about the database itself (start-up only, synchronous) ---- */

/* Reads the setting key into value (len bytes, cut if longer). STORE_NOT_FOUND when it
 * was never put. */
enum store_result store_setting_get(struct store *st, const char *key, char *value,
                                    size_t len);

/* Stores value under key (durable on STORE_OK), replacing what was there. */
enum store_result store_setting_put(struct store *st, const char *key, const char *value);

/* ---- asynchronous writes (SPEC §7: the loop never waits on the database) ----
 * Each *_async takes a copy of its arguments and calls done exactly once with the result
 * and, for inserts and replaces, the record with id and created_at filled (NULL for a
 * delete); done may be NULL (nobody waits for the outcome). The argument checks and the
 * gate answer at once, before the call returns.
 *
 * SQLite (and any store without a loop attached): the write is local and short, so it
 * runs synchronously and done is called before the *_async call returns. PostgreSQL with
 * a loop attached: writes are queued FIFO on a dedicated non-blocking connection, one at
 * a time, and done runs later from the loop, STORE_UNAVAILABLE when the database did not
 * answer within 1.5 s of the call. */
struct event_base;
struct evdns_base;
typedef void (*store_mapping_done_fn)(enum store_result r, const struct mapping_record *rec,
                                      void *arg);
typedef void (*store_client_done_fn)(enum store_result r, const struct client_record *rec,
                                     void *arg);

/* Moves the store's writes onto base (PostgreSQL: opens the write connection without
 * waiting; a reconnect resolves the database's host names with dns, never with a blocking
 * lookup on the loop). Returns 0, or -1 (writes then stay synchronous). */
int store_attach_loop(struct store *st, struct event_base *base, struct evdns_base *dns);
/* Installs fn, called after every asynchronous write (*_async) completed, after its own
 * callback, with its result. The cluster sync reads the tables again after a failed one:
 * a resync that arrived while the write was in flight left that row to its outcome. */
void store_set_write_hook(struct store *st, void (*fn)(enum store_result r, void *arg),
                          void *arg);
/* True once writes complete later, from the loop (PostgreSQL after store_attach_loop). */
bool store_writes_async(const struct store *st);
/* Completes every queued write with STORE_UNAVAILABLE, before the callers' owners go away
 * (shutdown). Writes submitted afterwards still work. NULL-safe. */
void store_fail_pending(struct store *st);

void store_mapping_insert_async(struct store *st, const struct mapping_record *rec,
                                store_mapping_done_fn done, void *arg);
void store_mapping_replace_async(struct store *st, const struct mapping_record *rec,
                                 store_mapping_done_fn done, void *arg);
/* The parts (enum store_field) in which a and b differ. */
unsigned store_mapping_changed_fields(const struct mapping_record *a,
                                      const struct mapping_record *b);
/* Stores the parts of rec that differ from base, the record the change was made from
 * (NULL: all of it), and the parts named (enum store_field), into the row of rec->port.
 * In a cluster: STORE_NOT_FOUND when no row holds the port any more; STORE_CONFLICT when
 * it is another mapping's (removed and created anew) or the destination is to change
 * and the row's is no longer base's. done gets the row as stored: it may hold another
 * node's change to the parts this one left alone. */
void store_mapping_update_async(struct store *st, const struct mapping_record *base,
                                const struct mapping_record *rec, unsigned named,
                                store_mapping_done_fn done, void *arg);
void store_mapping_delete_async(struct store *st, int port, store_mapping_done_fn done,
                                void *arg);
void store_client_insert_async(struct store *st, const struct client_record *rec,
                               store_client_done_fn done, void *arg);
/* Update and delete touch the row of rec->name / name only while it is the client of that
 * id (0: whichever): STORE_NOT_FOUND when no client has that name any more,
 * STORE_CONFLICT when another node removed it and created another of that name. */
void store_client_update_async(struct store *st, const struct client_record *rec,
                               store_client_done_fn done, void *arg);
void store_client_delete_async(struct store *st, const char *name, int64_t id,
                               store_client_done_fn done, void *arg);
/* Writes the client's last_seen and nothing else (done gets no record), while the row of
 * name is the client of that id (0: whichever). */
void store_client_touch_async(struct store *st, const char *name, int64_t id,
                              int64_t last_seen, store_client_done_fn done, void *arg);

#endif

/* Tunnel clients (SPEC §4a): who may open a tunnel and with which token. Clients from the
 * config file (source "config", read-only) and clients created through the API (source
 * "api", kept in the store). Only SHA-256 hashes of tokens are held, in memory and on
 * disk; tokens are generated here from OpenSSL's CSPRNG and shown once. */
#ifndef PORTMUX_CLIENTS_H
#define PORTMUX_CLIENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "client_name.h"
#include "log_limit.h"
#include "store.h"

struct config;

#define CLIENTS_NAME_MAX STORE_CLIENT_NAME_MAX
/* The shortest token a config file may hold (SPEC §4). */
#define CLIENTS_TOKEN_MIN_CONFIG CLIENT_TOKEN_MIN_CONFIG
/* Generated tokens: 32 random bytes in unpadded base64url = 43 characters. */
#define CLIENTS_TOKEN_RANDOM_BYTES 32
#define CLIENTS_TOKEN_LEN 43
/* rotate's default grace period for the old token. */
#define CLIENTS_DEFAULT_GRACE_S 300
/* The longest grace period rotate accepts (30 days). */
#define CLIENTS_MAX_GRACE_S (30 * 86400)

enum clients_source { CLIENTS_SOURCE_CONFIG, CLIENTS_SOURCE_API };

enum clients_result {
    CLIENTS_OK = 0,
    CLIENTS_ERR = -1,          /* the store failed; nothing changed */
    CLIENTS_NOT_FOUND = -2,
    CLIENTS_EXISTS = -3,
    CLIENTS_CONFIG = -4,       /* managed by the config file: read-only */
    CLIENTS_INVALID = -5,      /* bad name or argument */
    CLIENTS_UNAVAILABLE = -6,  /* the database did not answer in time (§7); nothing changed */
    CLIENTS_BUSY = -7,         /* a write for this client is in flight: try again */
    CLIENTS_UNCONFIRMED = -8,  /* the database did not confirm in time: it may be stored */
    CLIENTS_CONFLICT = -9,     /* another node re-created the client meanwhile; nothing changed */
};

struct clients_entry {
    char name[CLIENTS_NAME_MAX + 1];
    enum clients_source source;
    unsigned char hash[32];
    unsigned char prev_hash[32];
    bool has_prev;
    int64_t prev_valid_until;   /* unix seconds */
    int64_t created_at;         /* 0 for config clients */
    int64_t last_seen;          /* 0 = never */
    int64_t id;                 /* the stored row's; 0 for config clients, or not known */
    /* Since this server started (not stored), for /metrics and the status block. */
    uint64_t takeovers;         /* a silent session of this client was replaced */
    uint64_t refused;           /* a Hello with its credentials lost to a live session */
    bool synced;                /* clients_sync_*: seen in the read being applied */
    bool writing;               /* a rotate or remove is being stored (clients_*_async) */
    struct log_limit session_log; /* its sessions' lines: clients_session_log_take */
};

enum clients_event { CLIENTS_EVENT_TAKEOVER, CLIENTS_EVENT_REFUSED };

/* Lines a client's sessions write (connected, disconnected, a protocol error) per
 * CLIENTS_SESSION_LOG_PERIOD seconds before the rest are held back and counted. */
#define CLIENTS_SESSION_LOG_BURST 6
#define CLIENTS_SESSION_LOG_PERIOD 10

struct clients_registry;

/* True when name is 1-64 characters of [A-Za-z0-9._-]. */
bool clients_name_valid(const char *name);

/* Writes a fresh random token (CLIENTS_TOKEN_LEN URL-safe characters + NUL) into out,
 * which holds at least CLIENTS_TOKEN_LEN + 1 bytes. Returns 0, or -1 when the CSPRNG
 * fails. */
int clients_token_generate(char *out, size_t outlen);

/* Loads the config clients and the stored ones (a stored client whose name the config
 * also lists is shadowed by the config, with a warning). When there are none at all and
 * the tunnel is enabled, creates "default" with a random token and logs it once at warn. st may be NULL (tests:
 * config clients only). NULL + err on failure. */
struct clients_registry *clients_registry_new(const struct config *cfg, struct store *st,
                                              char *err, size_t errlen);
void clients_registry_free(struct clients_registry *reg);

/* True when token is the client's current token, or its previous one while the rotation's
 * grace period lasts (now in unix seconds). Unknown names cost the same hashing. */
bool clients_check(const struct clients_registry *reg, const char *name, const char *token,
                   size_t token_len, int64_t now);

/* SPEC §7: brings the API clients in line with a read of the shared store (another
 * node created, rotated or removed some). begin, then row for every stored client, then
 * end, which drops the API clients no row named. gone(name) is called for every client
 * that goes (to close its sessions): one no row names, and one whose row has another id
 * (removed and created anew between two reads). Config clients are never touched.
 * Returns how many changed. */
void clients_sync_begin(struct clients_registry *reg);
int clients_sync_row(struct clients_registry *reg, const struct client_record *rec,
                     void (*gone)(const char *name, void *arg), void *arg);
int clients_sync_end(struct clients_registry *reg, void (*gone)(const char *name, void *arg),
                     void *arg);

const struct clients_entry *clients_find(const struct clients_registry *reg, const char *name);

/* True when a line about a session of client name may be written now; *held gets how many
 * were held back before it. A client holding the token decides how often its sessions
 * start and end (a reconnect loop wrote 10,000 lines a second): CLIENTS_SESSION_LOG_BURST
 * per period. A name the registry does not know (reg NULL, or just removed) writes. */
bool clients_session_log_take(struct clients_registry *reg, const char *name, time_t now,
                              unsigned long *held);
size_t clients_count(const struct clients_registry *reg);
/* The i-th client, config clients first, then stored ones in name order. */
const struct clients_entry *clients_at(const struct clients_registry *reg, size_t i);

/* ---- asynchronous create, rotate, remove (SPEC §7: nothing waits on the database) ----
 * Checked at once, then stored; done runs exactly once, when the store answers (with
 * SQLite before the call returns), with the result and, on success of a create or rotate,
 * the new token (valid only during the call) and the end of the old token's grace period.
 * A rotate or remove of a client with a write in flight answers CLIENTS_BUSY. */
typedef void (*clients_done_fn)(enum clients_result r, const char *token,
                                int64_t valid_until, void *arg);
void clients_create_async(struct clients_registry *reg, const char *name,
                          clients_done_fn done, void *arg);
void clients_rotate_async(struct clients_registry *reg, const char *name, int64_t grace_s,
                          clients_done_fn done, void *arg);
void clients_remove_async(struct clients_registry *reg, const char *name,
                          clients_done_fn done, void *arg);

/* The same, synchronously: for start-up and tests, while the store has no loop attached
 * (store_attach_loop); afterwards they refuse with CLIENTS_ERR.
 * Creates an API client; its token (CLIENTS_TOKEN_LEN chars) goes to token. */
enum clients_result clients_create(struct clients_registry *reg, const char *name,
                                   char *token, size_t tokenlen);
/* New token for an API client; the old one stays valid for grace_s seconds (0 = not at
 * all). *valid_until gets the end of the grace period. */
enum clients_result clients_rotate(struct clients_registry *reg, const char *name,
                                   int64_t grace_s, char *token, size_t tokenlen,
                                   int64_t *valid_until);
enum clients_result clients_remove(struct clients_registry *reg, const char *name);
/* Counts a takeover or a refused duplicate Hello for the client. */
void clients_note(struct clients_registry *reg, const char *name, enum clients_event ev);
/* Records that the client was seen now (Hello accepted, session ended). The stored
 * last_seen is written without waiting (a failure is logged, at most once a minute). */
void clients_touch(struct clients_registry *reg, const char *name, int64_t now);

/* SIGHUP: the config's clients become cfg's (added, removed, token changed); API clients
 * stay, except one a new config client of the same name shadows. removed(name, arg) runs
 * for each config client that is gone, after the registry changed (to close its live
 * session). Returns 0, or -1 when out of memory (nothing changed). */
int clients_reload_config(struct clients_registry *reg, const struct config *cfg,
                          void (*removed)(const char *name, void *arg), void *arg);

#endif

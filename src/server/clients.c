/* Tunnel clients: config + stored, token hashing and checking, token generation.
 *
 * Tokens are hashed with plain SHA-256, unsalted: every token this server generates is 32
 * random bytes and config tokens must be 16+ characters, so there is no dictionary to
 * precompute and a slow password hash would buy nothing but CPU per Hello. */
#include "clients.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "client_name.h"
#include "config.h"
#include "log.h"
#include "log_limit.h"

#define CL_MOD "clients"

struct clients_registry {
    struct store *store;
    struct clients_entry *v;
    size_t len, cap;
    size_t nconfig;             /* v[0..nconfig) come from the config */
};

bool clients_name_valid(const char *name) { return client_name_valid(name); }

int clients_token_generate(char *out, size_t outlen)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    unsigned char raw[CLIENTS_TOKEN_RANDOM_BYTES];
    if (outlen < CLIENTS_TOKEN_LEN + 1 || RAND_bytes(raw, sizeof(raw)) != 1)
        return -1;
    /* base64url without padding: 6 bits per character, 256 bits -> 43 characters. */
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < sizeof(raw); i++) {
        acc = (acc << 8) | raw[i];
        bits += 8;
        while (bits >= 6) {
            bits -= 6;
            out[o++] = alphabet[(acc >> bits) & 63];
        }
    }
    if (bits > 0)
        out[o++] = alphabet[(acc << (6 - bits)) & 63];
    out[o] = '\0';
    OPENSSL_cleanse(raw, sizeof(raw));
    return 0;
}

static void cl_hash(const char *token, size_t len, unsigned char out[32])
{
    unsigned int n = 32;
    if (EVP_Digest(token, len, out, &n, EVP_sha256(), NULL) != 1) {
        /* Cannot happen with the built-in provider; a hash no token matches is safe. */
        log_error(CL_MOD, "SHA-256 failed");
        RAND_bytes(out, 32);
    }
}

static void cl_hex(const unsigned char h[32], char out[STORE_HASH_HEX + 1])
{
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", h[i]);
}

static int cl_unhex(const char *hex, unsigned char out[32])
{
    if (strlen(hex) != STORE_HASH_HEX)
        return -1;
    for (int i = 0; i < 32; i++) {
        unsigned int b;
        if (sscanf(hex + 2 * i, "%2x", &b) != 1)
            return -1;
        out[i] = (unsigned char)b;
    }
    return 0;
}

static struct clients_entry *cl_push(struct clients_registry *reg)
{
    if (reg->len == reg->cap) {
        size_t cap = reg->cap ? reg->cap * 2 : 8;
        struct clients_entry *v = realloc(reg->v, cap * sizeof(*v));
        if (!v)
            return NULL;
        reg->v = v;
        reg->cap = cap;
    }
    struct clients_entry *e = &reg->v[reg->len++];
    memset(e, 0, sizeof(*e));
    return e;
}

/* Moves the last entry to its place among the API clients (name order). */
static void cl_sort_last(struct clients_registry *reg)
{
    size_t i = reg->len - 1;
    struct clients_entry e = reg->v[i];
    while (i > reg->nconfig && strcmp(reg->v[i - 1].name, e.name) > 0) {
        reg->v[i] = reg->v[i - 1];
        i--;
    }
    reg->v[i] = e;
}

static struct clients_entry *cl_find(const struct clients_registry *reg, const char *name)
{
    for (size_t i = 0; i < reg->len; i++) {
        if (strcmp(reg->v[i].name, name) == 0)
            return &reg->v[i];
    }
    return NULL;
}

static void cl_to_record(const struct clients_entry *e, struct client_record *rec)
{
    memset(rec, 0, sizeof(*rec));
    snprintf(rec->name, sizeof(rec->name), "%s", e->name);
    cl_hex(e->hash, rec->token_hash);
    if (e->has_prev)
        cl_hex(e->prev_hash, rec->prev_hash);
    rec->prev_valid_until = e->has_prev ? e->prev_valid_until : 0;
    snprintf(rec->source, sizeof(rec->source), "api");
    rec->created_at = e->created_at;
    rec->last_seen = e->last_seen;
    rec->id = e->id;
}

static int cl_load_stored(const struct client_record *rec, void *arg)
{
    struct clients_registry *reg = arg;
    unsigned char h[32], ph[32];
    bool prev = rec->prev_hash[0] != '\0';
    if (!clients_name_valid(rec->name) || cl_unhex(rec->token_hash, h) != 0 ||
        (prev && cl_unhex(rec->prev_hash, ph) != 0)) {
        log_warn(CL_MOD, "stored client with a malformed row skipped");
        return 0;
    }
    if (cl_find(reg, rec->name)) {
        log_warn(CL_MOD, "stored client \"%s\" is shadowed by the config's client of that name",
                 rec->name);
        return 0;
    }
    struct clients_entry *e = cl_push(reg);
    if (!e)
        return 1;
    snprintf(e->name, sizeof(e->name), "%s", rec->name);
    e->source = CLIENTS_SOURCE_API;
    memcpy(e->hash, h, 32);
    if (prev) {
        memcpy(e->prev_hash, ph, 32);
        e->has_prev = true;
        e->prev_valid_until = rec->prev_valid_until;
    }
    e->created_at = rec->created_at;
    e->last_seen = rec->last_seen;
    e->id = rec->id;
    cl_sort_last(reg);
    return 0;
}

/* The settings key that says the first start made its client (migration 0005). */
#define CL_FIRST_CLIENT "first_client"

/* A database that cannot be read counts as one where it was made: a second "default"
 * is the worse mistake (the operator can create one; nobody can take a token back). */
static bool cl_first_client_made(struct store *st)
{
    char v[8];
    return store_setting_get(st, CL_FIRST_CLIENT, v, sizeof(v)) != STORE_NOT_FOUND;
}

struct clients_registry *clients_registry_new(const struct config *cfg, struct store *st,
                                              char *err, size_t errlen)
{
    struct clients_registry *reg = calloc(1, sizeof(*reg));
    if (!reg)
        goto nomem;
    reg->store = st;
    for (size_t i = 0; i < cfg->clients_len; i++) {
        struct clients_entry *e = cl_push(reg);
        if (!e)
            goto nomem;
        snprintf(e->name, sizeof(e->name), "%s", cfg->clients[i].name);
        e->source = CLIENTS_SOURCE_CONFIG;
        cl_hash(cfg->clients[i].token, strlen(cfg->clients[i].token), e->hash);
    }
    reg->nconfig = reg->len;
    if (st && store_client_foreach(st, cl_load_stored, reg) != STORE_OK) {
        snprintf(err, errlen, "cannot read the tunnel clients from the store");
        goto fail;
    }
    /* Nothing anywhere: a first start. A random token, never a built-in one. Without
     * the tunnel nobody could use it, so it waits for the first start with the tunnel.
     * Only the first: an operator who removed every client revoked them, and a fresh
     * "default" on the next start would undo that (CL_FIRST_CLIENT says it was made). */
    if (reg->len == 0 && st && cfg->tunnel_enabled && !cl_first_client_made(st)) {
        char token[CLIENTS_TOKEN_LEN + 1];
        enum clients_result r = clients_create(reg, CLIENT_NAME_DEFAULT, token, sizeof(token));
        /* Nodes of a cluster starting together (SPEC §7): another one stored it first,
         * and its log shows the token; take its row. */
        if (r == CLIENTS_EXISTS && store_client_foreach(st, cl_load_stored, reg) == STORE_OK) {
            log_info(CL_MOD, "tunnel client \"default\" was created by another node");
            return reg;
        }
        if (r != CLIENTS_OK) {
            snprintf(err, errlen, "cannot create the first tunnel client");
            goto fail;
        }
        log_warn(CL_MOD, "created tunnel client \"default\" with token %s "
                         "(shown once; rotate it with POST /api/client/rotate)", token);
        OPENSSL_cleanse(token, sizeof(token));
    }
    /* Also a database from before the setting, or a start that stopped right after the
     * create: any client at start means the first one was made. */
    if (reg->len > 0 && st && !cl_first_client_made(st) &&
        store_setting_put(st, CL_FIRST_CLIENT, "1") != STORE_OK)
        log_warn(CL_MOD, "cannot record that the first tunnel client was made; if every "
                         "client is removed, the next start makes \"default\" again");
    return reg;
nomem:
    snprintf(err, errlen, "out of memory");
fail:
    clients_registry_free(reg);
    return NULL;
}

void clients_registry_free(struct clients_registry *reg)
{
    if (!reg)
        return;
    if (reg->v)
        OPENSSL_cleanse(reg->v, reg->cap * sizeof(*reg->v));
    free(reg->v);
    free(reg);
}

bool clients_check(const struct clients_registry *reg, const char *name, const char *token,
                   size_t token_len, int64_t now)
{
    unsigned char h[32];
    cl_hash(token, token_len, h);
    const struct clients_entry *e = cl_find(reg, name);
    if (!e)
        return false;
    /* Both comparisons always run, so the time says nothing about which one matched. */
    bool cur = CRYPTO_memcmp(h, e->hash, 32) == 0;
    bool old = CRYPTO_memcmp(h, e->prev_hash, 32) == 0;
    return cur || (old && e->has_prev && now < e->prev_valid_until);
}

const struct clients_entry *clients_find(const struct clients_registry *reg, const char *name)
{
    return name ? cl_find(reg, name) : NULL;
}

size_t clients_count(const struct clients_registry *reg) { return reg->len; }

const struct clients_entry *clients_at(const struct clients_registry *reg, size_t i)
{
    return i < reg->len ? &reg->v[i] : NULL;
}

/* A write in flight for one client, and what to finish with. */
struct cl_op {
    struct clients_registry *reg;
    struct clients_entry next;  /* create: the new entry; rotate: the entry as it becomes */
    char token[CLIENTS_TOKEN_LEN + 1];
    int64_t grace_s;
    clients_done_fn done;
    void *arg;
};

static void cl_op_end(struct cl_op *op, enum clients_result r, bool with_token)
{
    op->done(r, with_token ? op->token : NULL, op->next.prev_valid_until, op->arg);
    OPENSSL_cleanse(op, sizeof(*op));
    free(op);
}

static enum clients_result cl_store_failure(enum store_result sr)
{
    /* NOT_FOUND: another node removed it while this write was on its way; CONFLICT: it
     * also created another client of that name. */
    return sr == STORE_UNAVAILABLE   ? CLIENTS_UNAVAILABLE
           : sr == STORE_UNCONFIRMED ? CLIENTS_UNCONFIRMED
           : sr == STORE_NOT_FOUND   ? CLIENTS_NOT_FOUND
           : sr == STORE_CONFLICT    ? CLIENTS_CONFLICT
                                     : CLIENTS_ERR;
}

static void cl_created(enum store_result sr, const struct client_record *rec, void *arg)
{
    struct cl_op *op = arg;
    struct clients_registry *reg = op->reg;
    if (sr == STORE_DUPLICATE) {
        cl_op_end(op, CLIENTS_EXISTS, false); /* another server of a cluster was first */
        return;
    }
    if (sr != STORE_OK) {
        cl_op_end(op, cl_store_failure(sr), false);
        return;
    }
    op->next.created_at = rec->created_at;
    op->next.id = rec->id;
    /* A resync may have brought the stored row in already: it is this one. */
    struct clients_entry *slot = cl_find(reg, op->next.name);
    if (!slot) {
        slot = cl_push(reg);
        if (!slot) {
            store_client_delete_async(reg->store, op->next.name, op->next.id, NULL, NULL);
            cl_op_end(op, CLIENTS_ERR, false);
            return;
        }
        *slot = op->next;
        cl_sort_last(reg);
    } else {
        *slot = op->next;
    }
    log_info(CL_MOD, "tunnel client \"%s\" created", op->next.name);
    cl_op_end(op, CLIENTS_OK, true);
}

void clients_create_async(struct clients_registry *reg, const char *name,
                          clients_done_fn done, void *arg)
{
    if (!clients_name_valid(name)) {
        done(CLIENTS_INVALID, NULL, 0, arg);
        return;
    }
    if (cl_find(reg, name)) {
        done(CLIENTS_EXISTS, NULL, 0, arg);
        return;
    }
    struct cl_op *op = reg->store ? calloc(1, sizeof(*op)) : NULL;
    if (!op) {
        done(CLIENTS_ERR, NULL, 0, arg);
        return;
    }
    op->reg = reg;
    op->done = done;
    op->arg = arg;
    snprintf(op->next.name, sizeof(op->next.name), "%s", name);
    op->next.source = CLIENTS_SOURCE_API;
    if (clients_token_generate(op->token, sizeof(op->token)) != 0) {
        log_error(CL_MOD, "the random generator failed");
        cl_op_end(op, CLIENTS_ERR, false);
        return;
    }
    cl_hash(op->token, strlen(op->token), op->next.hash);
    struct client_record rec;
    cl_to_record(&op->next, &rec);
    store_client_insert_async(reg->store, &rec, cl_created, op);
}

/* The API client named name, or why there is none to change. */
static enum clients_result cl_writable(struct clients_registry *reg, const char *name,
                                       struct clients_entry **out)
{
    if (!clients_name_valid(name))
        return CLIENTS_INVALID;
    struct clients_entry *e = cl_find(reg, name);
    if (!e)
        return CLIENTS_NOT_FOUND;
    if (e->source == CLIENTS_SOURCE_CONFIG)
        return CLIENTS_CONFIG;
    if (!reg->store)
        return CLIENTS_ERR;
    if (e->writing)
        return CLIENTS_BUSY;
    *out = e;
    return CLIENTS_OK;
}

/* The write that changes the stored client name: its op (name copied, the entry in *out),
 * or NULL after done was told why not. */
static struct cl_op *cl_op_for_name(struct clients_registry *reg, const char *name,
                                    clients_done_fn done, void *arg,
                                    struct clients_entry **out)
{
    enum clients_result r = cl_writable(reg, name, out);
    struct cl_op *op = r == CLIENTS_OK ? calloc(1, sizeof(*op)) : NULL;
    if (!op) {
        done(r == CLIENTS_OK ? CLIENTS_ERR : r, NULL, 0, arg);
        return NULL;
    }
    op->reg = reg;
    op->done = done;
    op->arg = arg;
    snprintf(op->next.name, sizeof(op->next.name), "%s", name);
    return op;
}

/* The entry is looked up again by name: the array may have moved or changed meanwhile. */
static struct clients_entry *cl_written(struct cl_op *op)
{
    struct clients_entry *e = cl_find(op->reg, op->next.name);
    if (e)
        e->writing = false;
    return e;
}

static void cl_rotated(enum store_result sr, const struct client_record *rec, void *arg)
{
    struct cl_op *op = arg;
    struct clients_entry *e = cl_written(op);
    if (sr != STORE_OK) {
        cl_op_end(op, cl_store_failure(sr), false);
        return;
    }
    if (e) {
        /* Only what the rotation changed: counters and last_seen moved on meanwhile. */
        memcpy(e->hash, op->next.hash, sizeof(e->hash));
        memcpy(e->prev_hash, op->next.prev_hash, sizeof(e->prev_hash));
        e->has_prev = op->next.has_prev;
        e->prev_valid_until = op->next.prev_valid_until;
    }
    log_info(CL_MOD, "tunnel client \"%s\": token rotated, the old one valid for %lld s",
             op->next.name, (long long)op->grace_s);
    cl_op_end(op, CLIENTS_OK, true);
}

void clients_rotate_async(struct clients_registry *reg, const char *name, int64_t grace_s,
                          clients_done_fn done, void *arg)
{
    struct clients_entry *e = NULL;
    if (grace_s < 0 || grace_s > CLIENTS_MAX_GRACE_S) {
        done(CLIENTS_INVALID, NULL, 0, arg);
        return;
    }
    struct cl_op *op = cl_op_for_name(reg, name, done, arg, &e);
    if (!op)
        return;
    op->grace_s = grace_s;
    if (clients_token_generate(op->token, sizeof(op->token)) != 0) {
        log_error(CL_MOD, "the random generator failed");
        cl_op_end(op, CLIENTS_ERR, false);
        return;
    }
    /* Changes go to a copy first: the store may refuse, and then nothing changed. */
    struct clients_entry *next = &op->next;
    *next = *e;
    int64_t now = (int64_t)time(NULL);
    memcpy(next->prev_hash, e->hash, 32);
    next->has_prev = grace_s > 0;
    next->prev_valid_until = grace_s > 0 ? now + grace_s : now;
    if (!next->has_prev)
        memset(next->prev_hash, 0, sizeof(next->prev_hash));
    cl_hash(op->token, strlen(op->token), next->hash);
    struct client_record rec;
    cl_to_record(next, &rec);
    e->writing = true;
    store_client_update_async(reg->store, &rec, cl_rotated, op);
}

static void cl_removed(enum store_result sr, const struct client_record *rec, void *arg)
{
    struct cl_op *op = arg;
    struct clients_registry *reg = op->reg;
    struct clients_entry *e = cl_written(op);
    if (sr != STORE_OK && sr != STORE_NOT_FOUND) {
        cl_op_end(op, cl_store_failure(sr), false);
        return;
    }
    if (e && e->source == CLIENTS_SOURCE_API) {
        size_t i = (size_t)(e - reg->v);
        OPENSSL_cleanse(e, sizeof(*e));
        memmove(&reg->v[i], &reg->v[i + 1], (reg->len - i - 1) * sizeof(*reg->v));
        reg->len--;
    }
    log_info(CL_MOD, "tunnel client \"%s\" removed", op->next.name);
    cl_op_end(op, CLIENTS_OK, false);
}

void clients_remove_async(struct clients_registry *reg, const char *name,
                          clients_done_fn done, void *arg)
{
    struct clients_entry *e = NULL;
    struct cl_op *op = cl_op_for_name(reg, name, done, arg, &e);
    if (!op)
        return;
    e->writing = true;
    store_client_delete_async(reg->store, name, e->id, cl_removed, op);
}

/* ---- the synchronous forms (start-up, tests) ---- */

struct cl_sync {
    bool done;
    enum clients_result r;
    char *token;
    size_t tokenlen;
    int64_t valid_until;
};

static void cl_sync_done(enum clients_result r, const char *token, int64_t valid_until,
                         void *arg)
{
    struct cl_sync *s = arg;
    s->done = true;
    s->r = r;
    s->valid_until = valid_until;
    if (token)
        snprintf(s->token, s->tokenlen, "%s", token);
}

/* With a loop attached the answer would come after this frame is gone. */
static bool cl_sync_allowed(const struct clients_registry *reg)
{
    if (reg->store && store_writes_async(reg->store)) {
        log_error(CL_MOD, "a synchronous client write after the store went asynchronous");
        return false;
    }
    return true;
}

enum clients_result clients_create(struct clients_registry *reg, const char *name,
                                   char *token, size_t tokenlen)
{
    if (tokenlen < CLIENTS_TOKEN_LEN + 1)
        return CLIENTS_INVALID;
    if (!cl_sync_allowed(reg))
        return CLIENTS_ERR;
    struct cl_sync s = {.token = token, .tokenlen = tokenlen};
    clients_create_async(reg, name, cl_sync_done, &s);
    return s.done ? s.r : CLIENTS_ERR;
}

enum clients_result clients_rotate(struct clients_registry *reg, const char *name,
                                   int64_t grace_s, char *token, size_t tokenlen,
                                   int64_t *valid_until)
{
    if (tokenlen < CLIENTS_TOKEN_LEN + 1)
        return CLIENTS_INVALID;
    if (!cl_sync_allowed(reg))
        return CLIENTS_ERR;
    struct cl_sync s = {.token = token, .tokenlen = tokenlen};
    clients_rotate_async(reg, name, grace_s, cl_sync_done, &s);
    if (s.done && s.r == CLIENTS_OK)
        *valid_until = s.valid_until;
    return s.done ? s.r : CLIENTS_ERR;
}

enum clients_result clients_remove(struct clients_registry *reg, const char *name)
{
    if (!cl_sync_allowed(reg))
        return CLIENTS_ERR;
    struct cl_sync s = {0};
    clients_remove_async(reg, name, cl_sync_done, &s);
    return s.done ? s.r : CLIENTS_ERR;
}

/* last_seen is informational: a failed write costs a log line, at most one a minute.
 * The count lives here, not in the registry: a write queued by a session that ends at
 * shutdown completes (STORE_UNAVAILABLE) when the store closes, after the registry. */
static struct log_limit cl_touch_log;

static void cl_touched(enum store_result sr, const struct client_record *rec, void *arg)
{
    if (sr == STORE_OK || sr == STORE_NOT_FOUND)
        return;
    unsigned long held;
    if (log_limit_take(&cl_touch_log, time(NULL), 60, &held))
        log_warn(CL_MOD, "storing a client's last_seen failed (%lu time(s) since the last "
                 "line)", held + 1);
}

void clients_touch(struct clients_registry *reg, const char *name, int64_t now)
{
    struct clients_entry *e = cl_find(reg, name);
    if (!e)
        return;
    e->last_seen = now;
    /* last_seen alone: this node's hashes may be older than the row's (another node
     * rotated or re-created the client and the change is still on its way here), and a
     * session's start or end must never write them back over the new ones. */
    if (e->source != CLIENTS_SOURCE_API || !reg->store)
        return;
    store_client_touch_async(reg->store, e->name, e->id, now, cl_touched, NULL);
}

bool clients_session_log_take(struct clients_registry *reg, const char *name, time_t now,
                              unsigned long *held)
{
    *held = 0;
    struct clients_entry *e = reg ? cl_find(reg, name) : NULL;
    return !e || log_limit_take_burst(&e->session_log, now, CLIENTS_SESSION_LOG_PERIOD,
                                      CLIENTS_SESSION_LOG_BURST, held);
}

void clients_note(struct clients_registry *reg, const char *name, enum clients_event ev)
{
    struct clients_entry *e = cl_find(reg, name);
    if (!e)
        return;
    if (ev == CLIENTS_EVENT_TAKEOVER)
        e->takeovers++;
    else
        e->refused++;
}

static bool cl_config_has(const struct config *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->clients_len; i++) {
        if (strcmp(cfg->clients[i].name, name) == 0)
            return true;
    }
    return false;
}

static struct clients_entry *cl_find_config(const struct clients_registry *reg, const char *name)
{
    for (size_t i = 0; i < reg->nconfig; i++) {
        if (strcmp(reg->v[i].name, name) == 0)
            return &reg->v[i];
    }
    return NULL;
}

/* A config client is gone: a stored client of that name, shadowed until now, serves
 * again (it would otherwise be neither listed nor creatable until a restart). SQLite
 * answers at once; a cluster's store is not read on the loop, and its next resync (at most
 * CSYNC_RESYNC_S later) brings the row in as one created by another node. */
static void cl_unshadow(struct clients_registry *reg, const char *name)
{
    struct client_record rec;
    if (!reg->store || store_writes_async(reg->store) ||
        store_client_get(reg->store, name, &rec) != STORE_OK)
        return;
    size_t before = reg->len;
    cl_load_stored(&rec, reg);
    if (reg->len > before)
        log_info(CL_MOD, "stored client \"%s\" is no longer shadowed by the config", name);
    OPENSSL_cleanse(&rec, sizeof(rec));
}

/* Builds the new array aside and swaps it in, so a failed allocation changes nothing.
 * A kept config client keeps its counters and last_seen; a changed token replaces the old
 * one at once (no grace: the file is the only copy), while its live session stays, as
 * after a rotate. */
int clients_reload_config(struct clients_registry *reg, const struct config *cfg,
                          void (*removed)(const char *name, void *arg), void *arg)
{
    size_t cap = cfg->clients_len + (reg->len - reg->nconfig) + 1;
    struct clients_entry *v = calloc(cap, sizeof(*v));
    if (!v)
        return -1;
    size_t n = 0;
    for (size_t i = 0; i < cfg->clients_len; i++) {
        const struct clients_entry *old = cl_find_config(reg, cfg->clients[i].name);
        struct clients_entry *e = &v[n++];
        unsigned char h[32];
        cl_hash(cfg->clients[i].token, strlen(cfg->clients[i].token), h);
        if (old) {
            *e = *old;
            if (CRYPTO_memcmp(h, old->hash, 32) != 0)
                log_info(CL_MOD, "tunnel client \"%s\": token changed in the config; a live "
                                 "session stays, the next Hello needs the new token", e->name);
        } else {
            snprintf(e->name, sizeof(e->name), "%s", cfg->clients[i].name);
            e->source = CLIENTS_SOURCE_CONFIG;
            log_info(CL_MOD, "tunnel client \"%s\" added from the config", e->name);
        }
        memcpy(e->hash, h, 32);
        e->has_prev = false;
        memset(e->prev_hash, 0, sizeof(e->prev_hash));
    }
    size_t nconfig = n;
    for (size_t i = reg->nconfig; i < reg->len; i++) {
        if (cl_config_has(cfg, reg->v[i].name)) {
            log_warn(CL_MOD, "stored client \"%s\" is shadowed by the config's client of that "
                             "name", reg->v[i].name);
            continue;
        }
        v[n++] = reg->v[i];
    }
    struct clients_entry *old_v = reg->v;
    size_t old_nconfig = reg->nconfig, old_cap = reg->cap;
    reg->v = v;
    reg->len = n;
    reg->cap = cap;
    reg->nconfig = nconfig;
    for (size_t i = 0; i < old_nconfig; i++) {
        if (cl_config_has(cfg, old_v[i].name))
            continue;
        log_info(CL_MOD, "tunnel client \"%s\" removed from the config", old_v[i].name);
        if (removed)
            removed(old_v[i].name, arg);
        cl_unshadow(reg, old_v[i].name);
    }
    OPENSSL_cleanse(old_v, old_cap * sizeof(*old_v));
    free(old_v);
    return 0;
}

/* ---- changes made by another node (SPEC §7) ---- */

void clients_sync_begin(struct clients_registry *reg)
{
    for (size_t i = 0; i < reg->len; i++)
        reg->v[i].synced = false;
}

int clients_sync_row(struct clients_registry *reg, const struct client_record *rec,
                     void (*gone)(const char *name, void *arg), void *arg)
{
    struct clients_entry *e = cl_find(reg, rec->name);
    if (!e) {
        size_t before = reg->len;
        cl_load_stored(rec, reg);
        e = reg->len > before ? cl_find(reg, rec->name) : NULL;
        if (!e)
            return 0;
        e->synced = true;
        log_info(CL_MOD, "tunnel client \"%s\" created by another node", rec->name);
        return 1;
    }
    e->synced = true;
    if (e->source != CLIENTS_SOURCE_API)
        return 0; /* the config's client shadows the stored one, as at start */
    unsigned char h[32], ph[32];
    bool prev = rec->prev_hash[0] != '\0';
    if (cl_unhex(rec->token_hash, h) != 0 || (prev && cl_unhex(rec->prev_hash, ph) != 0))
        return 0;
    int64_t valid = prev ? rec->prev_valid_until : 0;
    /* Removed and created again while this node was not reading: another client under
     * the old name, and the sessions, which were the old client's, end as a remove ends
     * them. */
    bool anew = e->id && rec->id && e->id != rec->id;
    if (!anew && memcmp(e->hash, h, 32) == 0 && e->has_prev == prev &&
        (!prev || (memcmp(e->prev_hash, ph, 32) == 0 && e->prev_valid_until == valid))) {
        e->id = e->id ? e->id : rec->id;
        return 0;
    }
    memcpy(e->hash, h, 32);
    e->has_prev = prev;
    memset(e->prev_hash, 0, sizeof(e->prev_hash));
    if (prev)
        memcpy(e->prev_hash, ph, 32);
    e->prev_valid_until = valid;
    e->id = rec->id ? rec->id : e->id;
    if (!anew) {
        log_info(CL_MOD, "tunnel client \"%s\": token rotated by another node", rec->name);
        return 1;
    }
    e->created_at = rec->created_at;
    e->last_seen = rec->last_seen;
    log_info(CL_MOD, "tunnel client \"%s\" removed and created anew by another node",
             rec->name);
    if (gone)
        gone(rec->name, arg);
    return 1;
}

int clients_sync_end(struct clients_registry *reg, void (*gone)(const char *name, void *arg),
                     void *arg)
{
    int changed = 0;
    size_t i = 0;
    while (i < reg->len) {
        struct clients_entry *e = &reg->v[i];
        if (e->source != CLIENTS_SOURCE_API || e->synced) {
            i++;
            continue;
        }
        char name[CLIENTS_NAME_MAX + 1];
        snprintf(name, sizeof(name), "%s", e->name);
        OPENSSL_cleanse(e, sizeof(*e));
        memmove(&reg->v[i], &reg->v[i + 1], (reg->len - i - 1) * sizeof(*reg->v));
        reg->len--;
        log_info(CL_MOD, "tunnel client \"%s\" removed by another node", name);
        if (gone)
            gone(name, arg);
        changed++;
    }
    return changed;
}

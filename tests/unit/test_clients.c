/* Unit tests for the tunnel client registry: names, token generation, hashing and the
 * rotation grace, config vs stored clients, the first-start default. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "clients.h"
#include "config.h"

static char tmpdir[64];

static void test_names(void)
{
    CHECK(clients_name_valid("default"));
    CHECK(clients_name_valid("edge-1.office_B"));
    CHECK(clients_name_valid("a"));
    char max[65];
    memset(max, 'x', 64);
    max[64] = '\0';
    CHECK(clients_name_valid(max));
    char over[66];
    memset(over, 'x', 65);
    over[65] = '\0';
    CHECK(!clients_name_valid(over));
    CHECK(!clients_name_valid(""));
    CHECK(!clients_name_valid(NULL));
    CHECK(!clients_name_valid("b\xc3\xbcro")); /* issue 14 item 8 */
    CHECK(!clients_name_valid("a b"));
    CHECK(!clients_name_valid("a/b"));
    CHECK(!clients_name_valid("a\nb"));
    CHECK(!clients_name_valid("we\"ird"));
}

static void test_tokens(void)
{
    char a[CLIENTS_TOKEN_LEN + 1], b[CLIENTS_TOKEN_LEN + 1], small[10];
    CHECK(clients_token_generate(a, sizeof(a)) == 0);
    CHECK(clients_token_generate(b, sizeof(b)) == 0);
    CHECK(strlen(a) == CLIENTS_TOKEN_LEN && strlen(a) >= 32);
    CHECK(strcmp(a, b) != 0);
    for (size_t i = 0; i < strlen(a); i++)
        CHECK(strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", a[i]));
    CHECK(clients_token_generate(small, sizeof(small)) == -1);
}

static void test_config_clients(void)
{
    struct config cfg;
    char err[256];
    const char *yaml = "tunnel: {clients: [{name: office, token: office-token-0123456789}]}";
    CHECK(config_init_defaults(&cfg) == 0);
    CHECK(config_load_string(&cfg, yaml, strlen(yaml), "t", err, sizeof(err)) == 0);
    struct clients_registry *reg = clients_registry_new(&cfg, NULL, err, sizeof(err));
    CHECK(reg != NULL);
    CHECK(clients_count(reg) == 1);
    const char *tok = "office-token-0123456789";
    int64_t now = time(NULL);
    CHECK(clients_check(reg, "office", tok, strlen(tok), now));
    CHECK(!clients_check(reg, "office", tok, strlen(tok) - 1, now));
    CHECK(!clients_check(reg, "office", "office-token-0123456788", strlen(tok), now));
    CHECK(!clients_check(reg, "other", tok, strlen(tok), now));
    const struct clients_entry *e = clients_find(reg, "office");
    CHECK(e && e->source == CLIENTS_SOURCE_CONFIG);
    /* Read-only through the API; no store, so nothing can be created either. */
    char t[CLIENTS_TOKEN_LEN + 1];
    int64_t until;
    CHECK(clients_rotate(reg, "office", 0, t, sizeof(t), &until) == CLIENTS_CONFIG);
    CHECK(clients_remove(reg, "office") == CLIENTS_CONFIG);
    CHECK(clients_create(reg, "office", t, sizeof(t)) == CLIENTS_EXISTS);
    CHECK(clients_remove(reg, "nobody") == CLIENTS_NOT_FOUND);
    clients_registry_free(reg);
    config_free(&cfg);
}

static void test_stored(void)
{
    char path[PATH_MAX], err[256];
    snprintf(path, sizeof(path), "%s/clients.db", tmpdir);
    struct config cfg;
    CHECK(config_init_defaults(&cfg) == 0);
    struct store *st = store_open(path, NULL, err, sizeof(err));
    CHECK(st != NULL);

    /* First start: nothing anywhere, so "default" is created with a random token. */
    struct clients_registry *reg = clients_registry_new(&cfg, st, err, sizeof(err));
    CHECK(reg != NULL && clients_count(reg) == 1);
    const struct clients_entry *d = clients_find(reg, "default");
    CHECK(d && d->source == CLIENTS_SOURCE_API && d->created_at > 0);
    CHECK(!clients_check(reg, "default", "change-me", 9, time(NULL)));

    char tok[CLIENTS_TOKEN_LEN + 1], tok2[CLIENTS_TOKEN_LEN + 1];
    CHECK(clients_create(reg, "edge", tok, sizeof(tok)) == CLIENTS_OK);
    CHECK(clients_create(reg, "edge", tok2, sizeof(tok2)) == CLIENTS_EXISTS);
    CHECK(clients_create(reg, "b\xc3\xbcro", tok2, sizeof(tok2)) == CLIENTS_INVALID);
    CHECK(clients_create(reg, "short", tok2, 10) == CLIENTS_INVALID);
    int64_t now = time(NULL);
    CHECK(clients_check(reg, "edge", tok, strlen(tok), now));
    /* Name order among the stored clients. */
    CHECK(strcmp(clients_at(reg, 0)->name, "default") == 0);
    CHECK(strcmp(clients_at(reg, 1)->name, "edge") == 0);
    CHECK(clients_at(reg, 2) == NULL);
    clients_touch(reg, "edge", 1234);
    clients_note(reg, "edge", CLIENTS_EVENT_TAKEOVER);
    clients_note(reg, "edge", CLIENTS_EVENT_REFUSED);
    clients_note(reg, "edge", CLIENTS_EVENT_REFUSED);
    CHECK(clients_find(reg, "edge")->takeovers == 1 && clients_find(reg, "edge")->refused == 2);

    /* Rotation with a grace period: both work until it ends, then only the new one. */
    int64_t until = 0;
    CHECK(clients_rotate(reg, "edge", 300, tok2, sizeof(tok2), &until) == CLIENTS_OK);
    CHECK(until >= now + 300 && until <= time(NULL) + 300);
    CHECK(strcmp(tok, tok2) != 0);
    CHECK(clients_check(reg, "edge", tok2, strlen(tok2), now));
    CHECK(clients_check(reg, "edge", tok, strlen(tok), now));
    CHECK(!clients_check(reg, "edge", tok, strlen(tok), until));
    CHECK(clients_check(reg, "edge", tok2, strlen(tok2), until + 1000));
    CHECK(clients_rotate(reg, "edge", -1, tok2, sizeof(tok2), &until) == CLIENTS_INVALID);
    CHECK(clients_rotate(reg, "nobody", 0, tok2, sizeof(tok2), &until) == CLIENTS_NOT_FOUND);
    clients_registry_free(reg);

    /* A restart reads the same clients back, hashes and grace included; no new default. */
    reg = clients_registry_new(&cfg, st, err, sizeof(err));
    CHECK(reg != NULL && clients_count(reg) == 2);
    CHECK(clients_check(reg, "edge", tok2, strlen(tok2), now));
    CHECK(clients_check(reg, "edge", tok, strlen(tok), now));
    CHECK(clients_find(reg, "edge")->last_seen == 1234);

    /* Rotation without grace: the old token stops at once. */
    char tok3[CLIENTS_TOKEN_LEN + 1];
    CHECK(clients_rotate(reg, "edge", 0, tok3, sizeof(tok3), &until) == CLIENTS_OK);
    CHECK(!clients_check(reg, "edge", tok2, strlen(tok2), now));
    CHECK(!clients_check(reg, "edge", tok, strlen(tok), now));
    CHECK(clients_check(reg, "edge", tok3, strlen(tok3), now));

    CHECK(clients_remove(reg, "edge") == CLIENTS_OK);
    CHECK(!clients_check(reg, "edge", tok3, strlen(tok3), now));
    CHECK(clients_find(reg, "edge") == NULL && clients_count(reg) == 1);
    struct client_record rec;
    CHECK(store_client_get(st, "edge", &rec) == STORE_NOT_FOUND);
    clients_registry_free(reg);

    /* A config client shadows a stored one of the same name; the store keeps the row. */
    const char *yaml = "tunnel: {clients: [{name: default, token: config-token-0123456789}]}";
    CHECK(config_load_string(&cfg, yaml, strlen(yaml), "t", err, sizeof(err)) == 0);
    reg = clients_registry_new(&cfg, st, err, sizeof(err));
    CHECK(reg != NULL && clients_count(reg) == 1);
    CHECK(clients_find(reg, "default")->source == CLIENTS_SOURCE_CONFIG);
    CHECK(clients_check(reg, "default", "config-token-0123456789", 23, now));
    clients_registry_free(reg);

    store_close(st);
    config_free(&cfg);
    unlink(path);
}

/* SIGHUP (issue 17): config clients added, removed (reported), token changed; API
 * clients stay unless a new config client shadows one. */
static const char *removed_names[4];
static size_t nremoved;

static void note_removed(const char *name, void *arg)
{
    (void)arg;
    if (nremoved < 4)
        removed_names[nremoved++] = strdup(name);
}

static void test_reload_config(void)
{
    char path[PATH_MAX], err[256], tok[CLIENTS_TOKEN_LEN + 1];
    snprintf(path, sizeof(path), "%s/reload.db", tmpdir);
    struct config cfg, next;
    const char *y1 = "tunnel: {clients: [{name: a, token: a-token-0123456789},"
                     " {name: b, token: b-token-0123456789}]}";
    const char *y2 = "tunnel: {clients: [{name: b, token: b-token-changed-0123},"
                     " {name: c, token: c-token-0123456789}, {name: api2, token: api2-config-0123456}]}";
    CHECK(config_init_defaults(&cfg) == 0 && config_init_defaults(&next) == 0);
    CHECK(config_load_string(&cfg, y1, strlen(y1), "t", err, sizeof(err)) == 0);
    CHECK(config_load_string(&next, y2, strlen(y2), "t", err, sizeof(err)) == 0);
    struct store *st = store_open(path, NULL, err, sizeof(err));
    CHECK(st != NULL);
    struct clients_registry *reg = clients_registry_new(&cfg, st, err, sizeof(err));
    CHECK(reg != NULL && clients_count(reg) == 2);
    CHECK(clients_create(reg, "api1", tok, sizeof(tok)) == CLIENTS_OK);
    CHECK(clients_create(reg, "api2", tok, sizeof(tok)) == CLIENTS_OK);
    clients_note(reg, "b", CLIENTS_EVENT_TAKEOVER);
    int64_t now = time(NULL);

    CHECK(clients_reload_config(reg, &next, note_removed, NULL) == 0);
    CHECK(nremoved == 1 && strcmp(removed_names[0], "a") == 0);
    CHECK(clients_find(reg, "a") == NULL);
    CHECK(!clients_check(reg, "a", "a-token-0123456789", 18, now));
    /* b: the new token only, its counters kept. */
    CHECK(!clients_check(reg, "b", "b-token-0123456789", 18, now));
    CHECK(clients_check(reg, "b", "b-token-changed-0123", 20, now));
    CHECK(clients_find(reg, "b")->takeovers == 1);
    CHECK(clients_check(reg, "c", "c-token-0123456789", 18, now));
    /* api1 stays; api2 is shadowed by the config's api2. Config clients come first. */
    CHECK(clients_count(reg) == 4);
    CHECK(strcmp(clients_at(reg, 0)->name, "b") == 0 && strcmp(clients_at(reg, 1)->name, "c") == 0);
    CHECK(strcmp(clients_at(reg, 2)->name, "api2") == 0 &&
          clients_at(reg, 2)->source == CLIENTS_SOURCE_CONFIG);
    CHECK(strcmp(clients_at(reg, 3)->name, "api1") == 0 &&
          clients_at(reg, 3)->source == CLIENTS_SOURCE_API);
    CHECK(clients_check(reg, "api2", "api2-config-0123456", 19, now));
    /* Config clients stay read-only; a new API client sorts among the API ones. */
    CHECK(clients_rotate(reg, "c", 0, tok, sizeof(tok), &now) == CLIENTS_CONFIG);
    CHECK(clients_create(reg, "api0", tok, sizeof(tok)) == CLIENTS_OK);
    CHECK(strcmp(clients_at(reg, 3)->name, "api0") == 0);
    for (size_t i = 0; i < nremoved; i++)
        free((void *)removed_names[i]);
    clients_registry_free(reg);
    store_close(st);
    config_free(&cfg);
    config_free(&next);
    unlink(path);
}

int main(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/portmux-clients-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_names();
    test_tokens();
    test_config_clients();
    test_stored();
    test_reload_config();
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return check_summary();
}

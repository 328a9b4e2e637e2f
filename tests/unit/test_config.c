/* Unit tests for config: defaults, a full file, every error class, the example file. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "config.h"

static int load(struct config *cfg, const char *yaml, char *err, size_t errlen)
{
    if (config_init_defaults(cfg) != 0)
        return -2;
    return config_load_string(cfg, yaml, strlen(yaml), "t.yaml", err, errlen);
}

static void check_defaults(const struct config *c, int line)
{
    check_at(c->port_from == 10000 && c->port_end == 10100, __FILE__, line, "port_range defaults");
    check_at(c->blacklist_len == 0, __FILE__, line, "blacklist empty");
    check_at(c->tunnel_enabled, __FILE__, line, "tunnel.enabled");
    check_at(strcmp(c->tunnel_listen_addr, "0.0.0.0") == 0, __FILE__, line, "tunnel.listen_addr");
    check_at(c->tunnel_listen_port == 9000, __FILE__, line, "tunnel.listen_port");
    /* No built-in client: a first start creates one with a random token (clients.h). */
    check_at(c->clients_len == 0, __FILE__, line, "tunnel.clients");
    check_at(c->takeover_probe_ms == 2000, __FILE__, line, "tunnel.takeover_probe_ms");
    check_at(strcmp(c->tls_cert_file, "") == 0 && strcmp(c->tls_key_file, "") == 0 &&
                 strcmp(c->tls_client_ca, "") == 0, __FILE__, line, "tunnel.tls");
    check_at(c->heartbeat_interval == 10 && c->heartbeat_timeout == 30, __FILE__, line, "heartbeat");
    check_at(c->connect_timeout == 10 && c->hello_timeout == 10, __FILE__, line, "timeouts");
    check_at(c->max_streams_per_client == 10000, __FILE__, line, "max_streams_per_client");
    check_at(c->tunnel_max_pending == 128, __FILE__, line, "tunnel.max_pending");
    check_at(c->session_buffer_limit == 64 * 1024 * 1024, __FILE__, line,
             "tunnel.session_buffer_limit");
    check_at(strcmp(c->api_listen_addr, "127.0.0.1") == 0, __FILE__, line, "api.listen_addr");
    check_at(c->api_listen_port == 8080, __FILE__, line, "api.listen_port");
    check_at(strcmp(c->api_token, "") == 0, __FILE__, line, "api.token");
    check_at(c->allowed_ips_len == 0, __FILE__, line, "api.allowed_ips");
    check_at(c->allowed_hosts_len == 0, __FILE__, line, "api.allowed_hosts");
    check_at(c->api_max_connections == 256, __FILE__, line, "api.max_connections");
    check_at(c->api_connection_timeout == 10, __FILE__, line, "api.connection_timeout");
    check_at(strcmp(c->db_path, "./data/mappings.db") == 0, __FILE__, line, "database.path");
    check_at(c->max_connections_per_mapping == 10000, __FILE__, line, "limits");
    check_at(strcmp(c->mappings_bind_addr, "0.0.0.0") == 0, __FILE__, line,
             "mappings.bind_addr");
    check_at(c->log_level == LOGL_INFO, __FILE__, line, "log.level");
}

static void test_defaults(void)
{
    struct config c;
    char err[256];
    CHECK(config_init_defaults(&c) == 0);
    check_defaults(&c, __LINE__);
    config_free(&c);

    /* Nothing, comments, an empty document, an explicit null: all mean "defaults". */
    const char *empty[] = {"", "# only a comment\n\n   # another\n", "---\n", "--- ~\n",
                           "---\n...\n", "tunnel:\n  # enabled: false\napi:\n"};
    for (size_t i = 0; i < sizeof(empty) / sizeof(empty[0]); i++) {
        strcpy(err, "untouched");
        CHECK(load(&c, empty[i], err, sizeof(err)) == 0);
        CHECK(err[0] == '\0');
        check_defaults(&c, __LINE__);
        config_free(&c);
    }
    config_free(NULL);
    config_free(&c); /* freeing twice is harmless */
}

static const char full_yaml[] =
    "# every key, none at its default\n"
    "port_range:\n"
    "  from: 20000\n"
    "  end: 20010\n"
    "  blacklist: [20001, 20005]\n"
    "tunnel:\n"
    "  enabled: no\n"
    "  listen_addr: \"::\"\n"
    "  listen_port: 0\n"
    "  clients:\n"
    "    - name: alpha\n"
    "      token: s3cret-0123456789\n"
    "    - {name: beta, token: '1234567890123456'}\n"
    "  tls: {cert_file: /etc/pm/cert.pem, key_file: /etc/pm/key.pem, client_ca: /etc/pm/ca.pem}\n"
    "  heartbeat_interval: 5\n"
    "  heartbeat_timeout: 15\n"
    "  connect_timeout: 3\n"
    "  hello_timeout: 4\n"
    "  max_streams_per_client: 50\n"
    "  max_pending: 7\n"
    "  session_buffer_limit: 0\n"
    "api:\n"
    "  listen_addr: '::1'\n"
    "  listen_port: 18080\n"
    "  token: 'tok#en'\n"
    "  allowed_ips:\n"
    "    - 127.0.0.1\n"
    "    - 10.0.0.0/8\n"
    "    - fd00::/8\n"
    "  max_connections: 32\n"
    "  connection_timeout: 7\n"
    "database:\n"
    "  path: /var/lib/portmux/m.db\n"
    "limits:\n"
    "  max_connections_per_mapping: 99\n"
    "log:\n"
    "  level: debug\n";

static void check_full(const struct config *c)
{
    CHECK(c->port_from == 20000 && c->port_end == 20010);
    CHECK(c->blacklist_len == 2 && c->blacklist[0] == 20001 && c->blacklist[1] == 20005);
    CHECK(!c->tunnel_enabled);
    CHECK(strcmp(c->tunnel_listen_addr, "::") == 0);
    CHECK(c->tunnel_listen_port == 0);
    CHECK(c->clients_len == 2);
    CHECK(strcmp(c->clients[0].name, "alpha") == 0 && strcmp(c->clients[0].token, "s3cret-0123456789") == 0);
    CHECK(strcmp(c->clients[1].name, "beta") == 0 && strcmp(c->clients[1].token, "1234567890123456") == 0);
    CHECK(strcmp(c->tls_cert_file, "/etc/pm/cert.pem") == 0);
    CHECK(strcmp(c->tls_key_file, "/etc/pm/key.pem") == 0);
    CHECK(strcmp(c->tls_client_ca, "/etc/pm/ca.pem") == 0);
    CHECK(c->heartbeat_interval == 5 && c->heartbeat_timeout == 15);
    CHECK(c->connect_timeout == 3 && c->hello_timeout == 4);
    CHECK(c->max_streams_per_client == 50);
    CHECK(c->tunnel_max_pending == 7 && c->session_buffer_limit == 0);
    CHECK(strcmp(c->api_listen_addr, "::1") == 0 && c->api_listen_port == 18080);
    CHECK(strcmp(c->api_token, "tok#en") == 0);
    CHECK(c->allowed_ips_len == 3);
    CHECK(c->allowed_ips[0].family == AF_INET && c->allowed_ips[0].prefix == 32);
    CHECK(c->allowed_ips[1].family == AF_INET && c->allowed_ips[1].prefix == 8);
    CHECK(c->allowed_ips[2].family == AF_INET6 && c->allowed_ips[2].prefix == 8);
    CHECK(c->api_max_connections == 32 && c->api_connection_timeout == 7);
    CHECK(strcmp(c->db_path, "/var/lib/portmux/m.db") == 0);
    CHECK(c->max_connections_per_mapping == 99);
    CHECK(c->log_level == LOGL_DEBUG);
}

static void test_full(void)
{
    struct config c;
    char err[256];
    CHECK(load(&c, full_yaml, err, sizeof(err)) == 0);
    if (err[0] != '\0')
        fprintf(stderr, "unexpected error: %s\n", err);
    check_full(&c);
    CHECK(config_port_allowed(&c, 20000));
    CHECK(config_port_allowed(&c, 20010));
    CHECK(!config_port_allowed(&c, 20001));
    CHECK(!config_port_allowed(&c, 20005));
    CHECK(!config_port_allowed(&c, 19999));
    CHECK(!config_port_allowed(&c, 20011));
    /* Loading again over a loaded config replaces the lists (and must not leak). */
    const char *again = "tunnel: {clients: [{name: z, token: tttttttttttttttt}]}\n"
                        "port_range: {blacklist: []}\napi: {allowed_ips: ['::1']}\n";
    CHECK(config_load_string(&c, again, strlen(again), "t2.yaml", err, sizeof(err)) == 0);
    CHECK(c.clients_len == 1 && strcmp(c.clients[0].name, "z") == 0);
    CHECK(c.blacklist_len == 0 && config_port_allowed(&c, 20001));
    CHECK(c.allowed_ips_len == 1 && c.allowed_ips[0].family == AF_INET6);
    config_free(&c);
}

static void test_values(void)
{
    struct config c;
    char err[256];
    /* Booleans: true/false/yes/no in any case. */
    const char *truthy[] = {"true", "yes", "True", "YES"};
    const char *falsy[] = {"false", "no", "False", "NO"};
    char yaml[128];
    for (int i = 0; i < 4; i++) {
        snprintf(yaml, sizeof(yaml), "tunnel: {enabled: %s}", falsy[i]);
        CHECK(load(&c, yaml, err, sizeof(err)) == 0 && !c.tunnel_enabled);
        config_free(&c);
        snprintf(yaml, sizeof(yaml), "tunnel:\n  enabled: %s\n", truthy[i]);
        CHECK(load(&c, yaml, err, sizeof(err)) == 0 && c.tunnel_enabled);
        config_free(&c);
    }
    /* The clients list replaces the default one, even when empty. */
    CHECK(load(&c, "tunnel: {clients: []}", err, sizeof(err)) == 0 && c.clients_len == 0);
    config_free(&c);
    CHECK(load(&c, "tunnel:\n  clients:\n", err, sizeof(err)) == 0 && c.clients_len == 0);
    config_free(&c);
    /* Edge values that are allowed. */
    CHECK(load(&c, "port_range: {from: 1, end: 65535}\napi: {listen_port: 65535}\n", err,
               sizeof(err)) == 0);
    CHECK(c.port_from == 1 && c.port_end == 65535 && c.api_listen_port == 65535);
    CHECK(config_port_allowed(&c, 1) && config_port_allowed(&c, 65535));
    CHECK(!config_port_allowed(&c, 0) && !config_port_allowed(&c, 65536));
    config_free(&c);
    CHECK(load(&c, "port_range: {from: 5000, end: 5000}\n", err, sizeof(err)) == 0);
    CHECK(config_port_allowed(&c, 5000) && !config_port_allowed(&c, 5001));
    config_free(&c);
    CHECK(load(&c, "tunnel: {heartbeat_interval: 1, heartbeat_timeout: 2}", err, sizeof(err)) == 0);
    config_free(&c);
    CHECK(load(&c, "log: {level: error}\napi: {token: ''}\n", err, sizeof(err)) == 0);
    CHECK(c.log_level == LOGL_ERROR && c.api_token[0] == '\0');
    config_free(&c);
    /* api.allowed_hosts: names and IP literals, stored in lower case. */
    CHECK(load(&c, "api: {allowed_hosts: [Portmux.Example.COM, 10.1.2.3, '::1']}\n", err,
               sizeof(err)) == 0);
    CHECK(c.allowed_hosts_len == 3 && strcmp(c.allowed_hosts[0], "portmux.example.com") == 0 &&
          strcmp(c.allowed_hosts[1], "10.1.2.3") == 0 && strcmp(c.allowed_hosts[2], "::1") == 0);
    config_free(&c);
    /* Integers as YAML writes them: a tab or trailing comment around the value is fine. */
    CHECK(load(&c, "api:\n  listen_port: 0   # ephemeral\n", err, sizeof(err)) == 0);
    CHECK(c.api_listen_port == 0);
    config_free(&c);
}

struct bad_case {
    int line;            /* of this table entry, for the failure report */
    const char *yaml;
    const char *prefix;  /* expected start of the message */
};

#define BAD(yaml, prefix) {__LINE__, yaml, prefix}

static const struct bad_case bad_cases[] = {
    /* unknown keys */
    BAD("foo: 1\n", "t.yaml:1: foo: unknown key"),
    BAD("log: {}\ntunnel:\n  listen_prot: 9\n", "t.yaml:3: tunnel.listen_prot: unknown key"),
    BAD("tunnel:\n  tls:\n    ca: x\n", "t.yaml:3: tunnel.tls.ca: unknown key"),
    BAD("tunnel:\n  clients:\n    - {name: a, token: bbbbbbbbbbbbbbbb, secret: c}\n",
        "t.yaml:3: tunnel.clients[0].secret: unknown key"),
    /* wrong types */
    BAD("api:\n  listen_port: abc\n", "t.yaml:2: api.listen_port: expected an integer"),
    BAD("api: {listen_port: \"8080\"}\n", "t.yaml:1: api.listen_port: expected an integer"),
    BAD("tunnel:\n  connect_timeout: 1.5\n", "t.yaml:2: tunnel.connect_timeout: expected an integer"),
    BAD("tunnel:\n  hello_timeout: 12abc\n", "t.yaml:2: tunnel.hello_timeout: expected an integer"),
    BAD("tunnel:\n  listen_port: 0x10\n", "t.yaml:2: tunnel.listen_port: expected an integer"),
    BAD("tunnel:\n  listen_port: 010\n", "t.yaml:2: tunnel.listen_port: expected an integer"),
    BAD("tunnel:\n  listen_port: +80\n", "t.yaml:2: tunnel.listen_port: expected an integer"),
    BAD("tunnel:\n  listen_port:\n", "t.yaml:2: tunnel.listen_port: expected an integer"),
    BAD("limits:\n  max_connections_per_mapping: [1]\n",
        "t.yaml:2: limits.max_connections_per_mapping: expected an integer"),
    BAD("tunnel:\n  enabled: abc\n", "t.yaml:2: tunnel.enabled: expected true or false"),
    BAD("tunnel:\n  enabled: 1\n", "t.yaml:2: tunnel.enabled: expected true or false"),
    BAD("tunnel:\n  enabled: \"true\"\n", "t.yaml:2: tunnel.enabled: expected true or false"),
    BAD("tunnel: 5\n", "t.yaml:1: tunnel: expected a mapping"),
    BAD("tunnel: [a]\n", "t.yaml:1: tunnel: expected a mapping"),
    BAD("api: {token: {a: b}}\n", "t.yaml:1: api.token: expected a string"),
    BAD("port_range: {blacklist: 22}\n", "t.yaml:1: port_range.blacklist: expected a list"),
    BAD("port_range:\n  blacklist:\n    - 22\n    - x\n",
        "t.yaml:4: port_range.blacklist[1]: expected an integer"),
    BAD("api: {allowed_ips: 10.0.0.0/8}\n", "t.yaml:1: api.allowed_ips: expected a list"),
    BAD("tunnel: {clients: [abc]}\n", "t.yaml:1: tunnel.clients[0]: expected a mapping"),
    BAD("api: {token: \"a\\0b\"}\n", "t.yaml:1: api.token: contains a NUL"),
    BAD("? [a]\n: 1\n", "t.yaml:1: (root): keys must be strings"),
    /* out of range */
    BAD("api:\n  listen_port: 65536\n", "t.yaml:2: api.listen_port: 65536 is out of range 0..65535"),
    BAD("api:\n  listen_port: -1\n", "t.yaml:2: api.listen_port: -1 is out of range"),
    BAD("tunnel: {listen_port: 99999999999999999999999}\n",
        "t.yaml:1: tunnel.listen_port: 99999999999999999999999 is out of range"),
    BAD("port_range:\n  from: 0\n", "t.yaml:2: port_range.from: 0 is out of range 1..65535"),
    BAD("port_range:\n  end: 65536\n", "t.yaml:2: port_range.end: 65536 is out of range"),
    BAD("port_range: {blacklist: [0]}\n", "t.yaml:1: port_range.blacklist[0]: 0 is out of range"),
    BAD("tunnel:\n  heartbeat_interval: 0\n", "t.yaml:2: tunnel.heartbeat_interval: 0 is out of"),
    BAD("tunnel:\n  heartbeat_timeout: 0\n", "t.yaml:2: tunnel.heartbeat_timeout: 0 is out of"),
    BAD("tunnel:\n  connect_timeout: 0\n", "t.yaml:2: tunnel.connect_timeout: 0 is out of"),
    BAD("tunnel:\n  hello_timeout: -5\n", "t.yaml:2: tunnel.hello_timeout: -5 is out of"),
    BAD("tunnel:\n  max_streams_per_client: 0\n", "t.yaml:2: tunnel.max_streams_per_client: 0 is"),
    BAD("tunnel:\n  max_pending: 0\n", "t.yaml:2: tunnel.max_pending: 0 is out of"),
    BAD("tunnel:\n  session_buffer_limit: -1\n", "t.yaml:2: tunnel.session_buffer_limit: -1 is"),
    BAD("api:\n  max_connections: 0\n", "t.yaml:2: api.max_connections: 0 is out of"),
    BAD("api:\n  connection_timeout: 0\n", "t.yaml:2: api.connection_timeout: 0 is out of"),
    BAD("limits:\n  max_connections_per_mapping: 0\n",
        "t.yaml:2: limits.max_connections_per_mapping: 0 is out of"),
    /* checks across keys: the key the file set last is blamed */
    BAD("port_range:\n  from: 200\n  end: 100\n", "t.yaml:3: port_range.end: port_range.from (200)"),
    BAD("port_range:\n  end: 100\n  from: 200\n", "t.yaml:3: port_range.from: port_range.from"),
    BAD("port_range: {from: 20000}\n", "t.yaml:1: port_range.from: port_range.from (20000) is"),
    BAD("tunnel:\n  heartbeat_interval: 30\n",
        "t.yaml:2: tunnel.heartbeat_interval: heartbeat_timeout (30) must be greater"),
    BAD("tunnel:\n  heartbeat_interval: 5\n  heartbeat_timeout: 5\n",
        "t.yaml:3: tunnel.heartbeat_timeout: heartbeat_timeout (5) must be greater"),
    /* values that do not parse */
    BAD("api:\n  allowed_ips: [10.0.0.0/8, 10.0.0.0/33]\n",
        "t.yaml:2: api.allowed_ips[1]: invalid CIDR \"10.0.0.0/33\""),
    BAD("api:\n  allowed_ips:\n    - 10.0.0.0/8\n    - nope\n",
        "t.yaml:4: api.allowed_ips[1]: invalid CIDR \"nope\""),
    BAD("api:\n  allowed_ips: [[1]]\n", "t.yaml:2: api.allowed_ips[0]: expected a CIDR"),
    BAD("api: {allowed_hosts: example.com}\n", "t.yaml:1: api.allowed_hosts: expected a list"),
    BAD("api:\n  allowed_hosts: [a.example, 'b.example:8080']\n",
        "t.yaml:2: api.allowed_hosts[1]: not a host name or IP address: \"b.example:8080\""),
    BAD("api:\n  allowed_hosts: ['http://a.example']\n",
        "t.yaml:2: api.allowed_hosts[0]: not a host name"),
    BAD("api:\n  allowed_hosts: [~]\n", "t.yaml:2: api.allowed_hosts[0]: expected a host name"),
    BAD("log:\n  level: verbose\n", "t.yaml:2: log.level: must be one of debug, info, warn, error"),
    BAD("log:\n  level: INFO\n", "t.yaml:2: log.level: must be one of"),
    BAD("api: {listen_addr: 'not an address!'}\n", "t.yaml:1: api.listen_addr: not an IP"),
    BAD("tunnel: {listen_addr: ''}\n", "t.yaml:1: tunnel.listen_addr: not an IP"),
    BAD("database: {path: ''}\n", "t.yaml:1: database.path: must not be empty"),
    /* duplicates */
    BAD("api:\n  listen_port: 1\n  listen_port: 2\n", "t.yaml:3: api.listen_port: duplicate key"),
    BAD("log: {}\nlog: {}\n", "t.yaml:2: log: duplicate key"),
    BAD("tunnel:\n  clients:\n    - {name: a, token: xxxxxxxxxxxxxxxx, name: b}\n",
        "t.yaml:3: tunnel.clients[0].name: duplicate key"),
    BAD("tunnel:\n  clients:\n    - {name: a, token: xxxxxxxxxxxxxxxx}\n    - {name: a, token: yyyyyyyyyyyyyyyy}\n",
        "t.yaml:4: tunnel.clients[1].name: duplicate client name \"a\""),
    /* incomplete clients */
    BAD("tunnel:\n  clients:\n    - name: a\n      token: xxxxxxxxxxxxxxxx\n    - name: b\n",
        "t.yaml:5: tunnel.clients[1].token: missing"),
    BAD("tunnel:\n  clients:\n    - token: xxxxxxxxxxxxxxxx\n", "t.yaml:3: tunnel.clients[0].name: missing"),
    BAD("tunnel: {clients: [{}]}\n", "t.yaml:1: tunnel.clients[0].name: missing"),
    BAD("tunnel: {clients: [{name: a, token: ''}]}\n",
        "t.yaml:1: tunnel.clients[0].token: must be at least 16 characters"),
    BAD("tunnel: {clients: [{name: , token: xxxxxxxxxxxxxxxx}]}\n",
        "t.yaml:1: tunnel.clients[0].name: must be 1-64 characters"),
    /* SPEC §4: no token under 16 characters, the old built-in one included; names are
     * [A-Za-z0-9._-]{1,64} (issue 14 item 8: "büro" twice). */
    BAD("tunnel:\n  clients:\n    - {name: default, token: change-me}\n",
        "t.yaml:3: tunnel.clients[0].token: must be at least 16 characters"),
    BAD("tunnel:\n  clients:\n    - {name: a, token: 123456789012345}\n",
        "t.yaml:3: tunnel.clients[0].token: must be at least 16 characters"),
    BAD("tunnel:\n  clients:\n    - {name: b\u00fcro, token: xxxxxxxxxxxxxxxx}\n",
        "t.yaml:3: tunnel.clients[0].name: must be 1-64 characters"),
    BAD("tunnel:\n  clients:\n    - {name: 'a b', token: xxxxxxxxxxxxxxxx}\n",
        "t.yaml:3: tunnel.clients[0].name: must be 1-64 characters"),
    BAD("tunnel:\n  clients:\n    - {name: "
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa, token: xxxxxxxxxxxxxxxx}\n",
        "t.yaml:3: tunnel.clients[0].name: must be 1-64 characters"),
    BAD("tunnel: {takeover_probe_ms: 0}\n", "t.yaml:1: tunnel.takeover_probe_ms: 0 is"),
    BAD("tunnel: {takeover_probe_ms: 12000}\n",
        "t.yaml:1: tunnel.takeover_probe_ms: 12000 is"),
    /* TLS halves */
    BAD("tunnel:\n  tls:\n    cert_file: /c.pem\n", "t.yaml:3: tunnel.tls.cert_file: set without"),
    BAD("tunnel:\n  tls:\n    key_file: /k.pem\n", "t.yaml:3: tunnel.tls.key_file: set without"),
    BAD("tunnel:\n  tls:\n    cert_file: /c.pem\n    key_file: ''\n",
        "t.yaml:3: tunnel.tls.cert_file: set without"),
    BAD("tunnel:\n  tls:\n    client_ca: /ca.pem\n", "t.yaml:3: tunnel.tls.client_ca: mutual TLS"),
    /* YAML itself */
    BAD("api:\n  token: a: b\n", "t.yaml:2: yaml: syntax error: mapping values are not allowed"),
    BAD("api: {allowed_ips: [::1]}\n", "t.yaml:1: yaml: syntax error:"), /* must be quoted */
    BAD("api:\n  listen_port: 1\n token: x\n", "t.yaml:3: yaml: syntax error:"),
    BAD("tunnel: {enabled: true\n", "t.yaml:2: yaml: syntax error:"),
    BAD("log:\n\tlevel: info\n", "t.yaml:2: yaml: syntax error:"),
    BAD("log:\n  level: \"info\n", "t.yaml:3: yaml: syntax error:"),
    BAD("log:\n  level: \xff\n", "t.yaml:2: yaml: syntax error:"),
    BAD("log: {}\n---\nlog: {}\n", "t.yaml:2: yaml: only one YAML document"),
    BAD("mappings:\n  bind_addr: example.com\n",
        "t.yaml:2: mappings.bind_addr: not an IPv4 or IPv6 address"),
    BAD("mappings: {bind_addr: 1}\n", "t.yaml:1: mappings.bind_addr: not an IPv4 or IPv6"),
    BAD("mappings: {bind: '::'}\n", "t.yaml:1: mappings.bind: unknown key"),
    BAD("api:\n  token: &t x\n  listen_addr: *t\n",
        "t.yaml:3: api.listen_addr: aliases are not supported"),
    /* a top level that is not a mapping */
    /* SPEC §7: SQLite or PostgreSQL, not both; the URL names PostgreSQL; node names */
    BAD("database:\n  path: /x.db\n  url: postgres://u@h/db\n",
        "t.yaml:3: database.url: database.path and database.url are both set; keep one"),
    BAD("database:\n  url: postgres://u@h/db\n  path: /x.db\n",
        "t.yaml:3: database.path: database.path and database.url are both set"),
    /* A token with a space or a control character never matches what a peer sends. */
    BAD("api: {token: 'tok en-0123456789'}\n",
        "t.yaml:1: api.token: must be printable ASCII without spaces (a trailing newline?)"),
    BAD("api: {token: \"tok-0123456789abcdef\\n\"}\n",
        "t.yaml:1: api.token: must be printable ASCII without spaces (a trailing newline?)"),
    BAD("tunnel: {clients: [{name: a, token: \"tok-0123456789abcdef\\t\"}]}\n",
        "t.yaml:1: tunnel.clients[0].token: must be printable ASCII without spaces"),
    /* The API binds a literal (and the token rule compares it with loopback). */
    BAD("api: {listen_addr: localhost}\n",
        "t.yaml:1: api.listen_addr: not an IPv4 or IPv6 address: \"localhost\""),
    BAD("database: {url: 'mysql://u@h/db'}\n",
        "t.yaml:1: database.url: must be a postgres:// or postgresql:// URL that libpq can "
        "parse (check its percent-escapes, brackets and port)"),
    /* Malformed for libpq: refused here, where the message need not quote the password. */
    BAD("database: {url: 'postgres://u:SECRETPW@[zz/x'}\n",
        "t.yaml:1: database.url: must be a postgres:// or postgresql:// URL that libpq can "
        "parse (check its percent-escapes, brackets and port)"),
    BAD("database: {url: 'postgres://u:SEC%zzRETPW@h/db'}\n",
        "t.yaml:1: database.url: must be a postgres:// or postgresql:// URL that libpq can "
        "parse (check its percent-escapes, brackets and port)"),
    /* A port libpq would only refuse when it connects (exit 1, as if the database were
     * down), refused as the config error it is. */
    BAD("database: {url: 'postgres://u:SECRETPW@h:99999/db'}\n",
        "t.yaml:1: database.url: must be a postgres:// or postgresql:// URL that libpq can "
        "parse (check its percent-escapes, brackets and port)"),
    BAD("database: {url: 'postgres://u@h1:5432,h2:0/db'}\n",
        "t.yaml:1: database.url: must be a postgres:// or postgresql:// URL that libpq can "
        "parse (check its percent-escapes, brackets and port)"),
    BAD("cluster: {node_name: 'a b'}\n",
        "t.yaml:1: cluster.node_name: must be at most 64 characters of A-Z a-z 0-9 . _ -"),
    BAD("cluster: {nodename: a}\n", "t.yaml:1: cluster.nodename: unknown key"),
    BAD("- a\n- b\n", "t.yaml:1: (root): top level must be a mapping, got a list"),
    BAD("hello\n", "t.yaml:1: (root): top level must be a mapping, got a string"),
    BAD("\n\n'quoted'\n", "t.yaml:3: (root): top level must be a mapping"),
};

static void test_bind_addr(void)
{
    const char *ok[] = {"mappings: {bind_addr: '::'}\n", "mappings: {bind_addr: 127.0.0.2}\n",
                        "mappings: {bind_addr: '::1'}\n"};
    const char *want[] = {"::", "127.0.0.2", "::1"};
    for (int i = 0; i < 3; i++) {
        struct config c;
        char err[256] = "";
        CHECK(load(&c, ok[i], err, sizeof(err)) == 0);
        CHECK(c.mappings_bind_addr && strcmp(c.mappings_bind_addr, want[i]) == 0);
        config_free(&c);
    }
}

static void test_cluster_keys(void)
{
    struct config c;
    char err[256] = "";
    CHECK(load(&c, "", err, sizeof(err)) == 0);
    CHECK(strcmp(c.db_url, "") == 0 && strcmp(c.cluster_node_name, "") == 0 &&
          strcmp(c.cluster_advertise, "") == 0);
    config_free(&c);
    /* The default path stays as it is: only a path written in the file conflicts. */
    CHECK(load(&c,
               "database: {url: 'postgresql://p:s@127.0.0.1:5432/portmux'}\n"
               "cluster: {node_name: node-1.a_b, advertise: '10.0.0.2:9000'}\n",
               err, sizeof(err)) == 0);
    CHECK(strcmp(c.db_url, "postgresql://p:s@127.0.0.1:5432/portmux") == 0);
    CHECK(strcmp(c.cluster_node_name, "node-1.a_b") == 0);
    CHECK(strcmp(c.cluster_advertise, "10.0.0.2:9000") == 0);
    config_free(&c);
    CHECK(config_db_url_ok("postgres://x") && config_db_url_ok("postgresql://x"));
    CHECK(!config_db_url_ok("postgres:/x") && !config_db_url_ok("") &&
          !config_db_url_ok("file:///x.db"));
    /* Ports: 1-65535, each of a host list. */
    CHECK(config_db_url_ok("postgres://u@h:5432/db") &&
          config_db_url_ok("postgres://u@h1:5432,h2:5433/db") &&
          config_db_url_ok("postgresql://u@[::1]:65535/db"));
    CHECK(!config_db_url_ok("postgres://u@h:0/db") && !config_db_url_ok("postgres://u@h:65536/db") &&
          !config_db_url_ok("postgres://u@h:54x/db") &&
          !config_db_url_ok("postgres://u@h1:5432,h2:99999/db"));
}

static void test_errors(void)
{
    for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++) {
        const struct bad_case *b = &bad_cases[i];
        struct config c;
        char err[256] = "";
        int rc = load(&c, b->yaml, err, sizeof(err));
        int ok = rc == -1 && strncmp(err, b->prefix, strlen(b->prefix)) == 0 &&
                 strchr(err, '\n') == NULL;
        check_at(ok, __FILE__, b->line, b->prefix);
        if (!ok)
            fprintf(stderr, "    rc=%d, got: %s\n", rc, err);
        config_free(&c);
    }
}

static void test_error_buffers(void)
{
    struct config c;
    /* A short buffer truncates; a NULL one is allowed. */
    char small[12];
    CHECK(load(&c, "foo: 1\n", small, sizeof(small)) == -1);
    CHECK(strcmp(small, "t.yaml:1: f") == 0);
    config_free(&c);
    CHECK(load(&c, "foo: 1\n", NULL, 0) == -1);
    config_free(&c);
    /* A key with a newline still gives one line. */
    char err[256];
    CHECK(load(&c, "\"a\\nb\": 1\n", err, sizeof(err)) == -1);
    CHECK(strchr(err, '\n') == NULL && strncmp(err, "t.yaml:1: a?b: unknown key", 26) == 0);
    config_free(&c);
    /* Bytes that are not text, and no bytes at all. */
    config_init_defaults(&c);
    CHECK(config_load_string(&c, "log: {}\0\1", 9, "t.yaml", err, sizeof(err)) == -1);
    CHECK(strncmp(err, "t.yaml:1: yaml: syntax error", 28) == 0);
    CHECK(config_load_string(&c, NULL, 0, "t.yaml", err, sizeof(err)) == 0);
    config_free(&c);
}

static void test_files(void)
{
    struct config c;
    char err[512];
    config_init_defaults(&c);
    CHECK(config_load_file(&c, "/nonexistent/portmux.yaml", err, sizeof(err)) == -1);
    CHECK(strcmp(err, "/nonexistent/portmux.yaml: cannot read: No such file or directory") == 0);
    CHECK(config_load_file(&c, "/", err, sizeof(err)) == -1);
    CHECK(strcmp(err, "/: cannot read: is a directory") == 0);
    check_defaults(&c, __LINE__);

    char path[] = "/tmp/test_config_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd < 0)
        return;
    FILE *f = fdopen(fd, "w");
    fputs(full_yaml, f);
    fclose(f);
    CHECK(config_load_file(&c, path, err, sizeof(err)) == 0);
    check_full(&c);
    config_free(&c);

    /* Errors from a file name the file. */
    f = fopen(path, "w");
    fputs("log:\n  level: loud\n", f);
    fclose(f);
    config_init_defaults(&c);
    CHECK(config_load_file(&c, path, err, sizeof(err)) == -1);
    char want[128];
    snprintf(want, sizeof(want), "%s:2: log.level: ", path);
    CHECK(strncmp(err, want, strlen(want)) == 0);
    config_free(&c);
    unlink(path);
}

/* The repository root: $PORTMUX_SOURCE_DIR, else derived from this file's absolute path. */
static void source_dir(char *buf, size_t len)
{
    const char *env = getenv("PORTMUX_SOURCE_DIR");
    if (env != NULL && env[0] != '\0') {
        snprintf(buf, len, "%s", env);
        return;
    }
    /* CMake passes absolute source paths; a relative one is relative to the root. */
    snprintf(buf, len, "%s", __FILE__);
    char *tail = strstr(buf, "tests/unit/test_config.c");
    if (tail == buf)
        snprintf(buf, len, ".");
    else if (tail != NULL)
        tail[-1] = '\0';
}

/* The example documents the defaults: loading it must give exactly the defaults. */
static void test_example(void)
{
    char path[1024], root[900], err[512];
    source_dir(root, sizeof(root));
    snprintf(path, sizeof(path), "%s/config.yaml.example", root);
    struct config c;
    config_init_defaults(&c);
    /* Start from different values so the example must set each key back. */
    const char *skew = "port_range: {from: 1, end: 2, blacklist: [1]}\n"
                       "tunnel: {enabled: false, listen_port: 1, hello_timeout: 99,"
                       " clients: [{name: x, token: yyyyyyyyyyyyyyyy}], heartbeat_interval: 1,"
                       " takeover_probe_ms: 7,"
                       " heartbeat_timeout: 2, connect_timeout: 99, max_streams_per_client: 9,"
                       " max_pending: 9, session_buffer_limit: 9,"
                       " listen_addr: 1.1.1.1, tls: {cert_file: a, key_file: b, client_ca: c}}\n"
                       "api: {listen_addr: '::1', listen_port: 1, token: t, allowed_ips: ['::1'],"
                       " allowed_hosts: [x.example],"
                       " max_connections: 9, connection_timeout: 99}\n"
                       "database: {path: p}\nlimits: {max_connections_per_mapping: 9}\n"
                       "mappings: {bind_addr: '::'}\n"
                       "log: {level: error}\n";
    CHECK(config_load_string(&c, skew, strlen(skew), "skew", err, sizeof(err)) == 0);
    int rc = config_load_file(&c, path, err, sizeof(err));
    CHECK(rc == 0);
    if (rc != 0)
        fprintf(stderr, "    %s\n", err);
    check_defaults(&c, __LINE__);
    config_free(&c);
}

int main(void)
{
    test_defaults();
    test_full();
    test_values();
    test_errors();
    test_bind_addr();
    test_cluster_keys();
    test_error_buffers();
    test_files();
    test_example();
    return check_summary();
}

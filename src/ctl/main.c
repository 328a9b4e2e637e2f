/* portmux-ctl: management CLI for portmux-server's HTTP API (mappings, tunnel clients,
 * health). One request per run; exit status by outcome (ctl.h). */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "token_text.h"

#define CTL_DEFAULT_API "http://127.0.0.1:8080"
#define CTL_DEFAULT_TIMEOUT 10

static void ctl_usage(FILE *f)
{
    fprintf(f,
        "usage: portmux-ctl [--api URL] [--token TOKEN] [--json] [--timeout S] COMMAND\n"
        "\n"
        "Manages a running portmux-server through its HTTP API.\n"
        "\n"
        "  mapping add [FIELDS]           create a mapping (no --port: the server picks one)\n"
        "  mapping list                   every mapping with its status and counters\n"
        "  mapping update PORT FIELDS     change fields of the mapping on PORT\n"
        "  mapping rm PORT                remove the mapping on PORT\n"
        "  client add NAME                create a tunnel client; prints its token once\n"
        "  client list                    every tunnel client\n"
        "  client rotate NAME [--grace S] new token; the old one works S seconds more\n"
        "  client rm NAME                 remove a tunnel client\n"
        "  health                         the server's /health\n"
        "\n"
        "FIELDS: --port N --target-ip ADDR --target-port N --tunnel|--direct --client NAME\n"
        "        --name LABEL --allow-from CIDR[,CIDR...] --allow-any\n"
        "        --proxy-protocol none|v1|v2 --max-connections N --rate-limit BYTES_PER_S\n"
        "        --enable|--disable\n"
        "\n"
        "  --api URL      the API (default $PORTMUX_API, else " CTL_DEFAULT_API ")\n"
        "  --token TOKEN  bearer token (default $PORTMUX_API_TOKEN)\n"
        "  --json         print the API's data as JSON instead of a table\n"
        "  --timeout S    seconds to wait for the whole answer (default 10)\n"
        "  -h, --help     this text;  -V, --version  the version\n"
        "\n"
        "Exit status: 0 done, 1 the API refused (its error code is printed), 2 usage,\n"
        "3 the server cannot be reached.\n");
}

static const char *ctl_env(const char *name, const char *fallback)
{
    const char *v = getenv(name);
    return v && v[0] ? v : fallback;
}

/* Global options stop at the first word that is not an option (the command). */
static int ctl_parse_globals(int argc, char **argv, struct ctl_opts *o)
{
    static const struct option opts[] = {
        {"api", required_argument, NULL, 'a'},   {"token", required_argument, NULL, 't'},
        {"json", no_argument, NULL, 'j'},        {"timeout", required_argument, NULL, 'T'},
        {"help", no_argument, NULL, 'h'},        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    long long timeout;
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "+hV", opts, NULL)) != -1) {
        switch (c) {
        case 'a': o->api_url = optarg; break;
        case 't': o->token = optarg; break;
        case 'j': o->json = true; break;
        case 'T':
            if (ctl_parse_int("--timeout", optarg, 1, 3600, &timeout) != 0)
                return CTL_USAGE;
            o->timeout_s = (int)timeout;
            break;
        case 'h': ctl_usage(stdout); return -1;
        case 'V': printf("portmux-ctl %s\n", PORTMUX_VERSION); return -1;
        default:
            fprintf(stderr, "portmux-ctl: unknown or incomplete option '%s'\n",
                    argv[optind - 1]);
            ctl_usage(stderr);
            return CTL_USAGE;
        }
    }
    if (!token_text_ok(o->token)) {
        fprintf(stderr, "portmux-ctl: the token (--token or PORTMUX_API_TOKEN) must be "
                        "printable ASCII without spaces (a trailing newline?)\n");
        return CTL_USAGE;
    }
    return CTL_OK;
}

int main(int argc, char **argv)
{
    struct ctl_opts o = {
        .api_url = ctl_env("PORTMUX_API", CTL_DEFAULT_API),
        .token = ctl_env("PORTMUX_API_TOKEN", ""),
        .timeout_s = CTL_DEFAULT_TIMEOUT,
    };
    signal(SIGPIPE, SIG_IGN);
    int rc = ctl_parse_globals(argc, argv, &o);
    if (rc < 0)
        return CTL_OK; /* --help, --version */
    if (rc != CTL_OK)
        return rc;
    int n = argc - optind;
    char **args = argv + optind;
    /* Each command parses its own options from its argv[0]. */
    if (n >= 2 && strcmp(args[0], "mapping") == 0)
        return ctl_mapping_main(&o, n - 1, args + 1);
    if (n >= 2 && strcmp(args[0], "client") == 0)
        return ctl_client_main(&o, n - 1, args + 1);
    if (n >= 1 && strcmp(args[0], "health") == 0)
        return ctl_health_main(&o, n, args);
    if (n == 0)
        fprintf(stderr, "portmux-ctl: a command is needed\n");
    else
        fprintf(stderr, "portmux-ctl: unknown command '%s'\n", args[0]);
    ctl_usage(stderr);
    return CTL_USAGE;
}

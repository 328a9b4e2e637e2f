/* Unit tests for one relay direction's half-close state (src/common/relay_dir.c): it only
 * moves forward, and every move is logged at debug under the owner's module. */
#include "check.h"
#include "log.h"
#include "relay_dir.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Runs relay_dir_set with stderr sent to a temporary file; returns what was logged. */
static const char *set_logged(enum relay_dir_state *s, enum relay_dir_state next)
{
    static char out[1024];
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    FILE *tmp = tmpfile();
    CHECK(saved >= 0 && tmp != NULL);
    dup2(fileno(tmp), STDERR_FILENO);
    relay_dir_set(s, next, "forward", "relay fd", 7, "public->target");
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    rewind(tmp);
    size_t n = fread(out, 1, sizeof(out) - 1, tmp);
    out[n] = '\0';
    fclose(tmp);
    return out;
}

int main(void)
{
    log_set_level(LOGL_DEBUG);
    enum relay_dir_state s = RELAY_DIR_OPEN;

    const char *line = set_logged(&s, RELAY_DIR_EOF);
    CHECK(s == RELAY_DIR_EOF);
    CHECK(strstr(line, "forward") != NULL);
    CHECK(strstr(line, "relay fd 7 public->target: open -> eof") != NULL);

    /* A repeated EOF (libevent may report one twice) changes and logs nothing. */
    CHECK(set_logged(&s, RELAY_DIR_EOF)[0] == '\0');
    CHECK(s == RELAY_DIR_EOF);

    CHECK(strstr(set_logged(&s, RELAY_DIR_FIN_SENT), "eof -> fin_sent") != NULL);
    CHECK(s == RELAY_DIR_FIN_SENT);

    /* Never back: a done direction stays done. */
    CHECK(set_logged(&s, RELAY_DIR_OPEN)[0] == '\0');
    CHECK(set_logged(&s, RELAY_DIR_EOF)[0] == '\0');
    CHECK(s == RELAY_DIR_FIN_SENT);

    /* Straight from open to fin_sent is allowed (the FIN is passed on at once). */
    enum relay_dir_state t = RELAY_DIR_OPEN;
    CHECK(strstr(set_logged(&t, RELAY_DIR_FIN_SENT), "open -> fin_sent") != NULL);

    /* Above debug, the state still moves and nothing is printed. */
    log_set_level(LOGL_INFO);
    enum relay_dir_state u = RELAY_DIR_OPEN;
    CHECK(set_logged(&u, RELAY_DIR_EOF)[0] == '\0');
    CHECK(u == RELAY_DIR_EOF);

    CHECK(strcmp(relay_dir_state_name(RELAY_DIR_OPEN), "open") == 0);
    CHECK(strcmp(relay_dir_state_name(RELAY_DIR_FIN_SENT), "fin_sent") == 0);
    return check_summary();
}

/* Unit tests for one relay direction's half-close state (src/common/relay_dir.c): it only
 * moves forward, and every move is logged at debug under the owner's module. And
 * relay_dir_source_dead on real loopback TCP sockets: a reset is dead, an orderly close
 * with bytes still unread is not. */
#include "check.h"
#include "log.h"
#include "relay_dir.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* A connected loopback pair: *peer dialled, *ours accepted (what a relay holds). */
static void tcp_pair(int *peer, int *ours)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(l >= 0 && bind(l, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(l, 1) == 0);
    CHECK(getsockname(l, (struct sockaddr *)&a, &len) == 0);
    *peer = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(*peer, (struct sockaddr *)&a, sizeof(a)) == 0);
    *ours = accept(l, NULL, NULL);
    CHECK(*ours >= 0);
    close(l);
}

/* Waits (at most 5 s) until ours reaches TCP state st. */
static int reaches(int ours, int st)
{
    for (int i = 0; i < 500; i++) {
        struct tcp_info ti;
        socklen_t len = sizeof(ti);
        if (getsockopt(ours, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 && ti.tcpi_state == st)
            return 1;
        nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    }
    return 0;
}

static void source_dead_checks(void)
{
    int peer, ours;
    /* Live, with bytes unread: not dead. */
    tcp_pair(&peer, &ours);
    CHECK(send(peer, "abc", 3, 0) == 3);
    CHECK(!relay_dir_source_dead(ours));
    /* Reset by the peer while they wait unread (SO_LINGER 0): dead. */
    struct linger lg = {1, 0};
    CHECK(setsockopt(peer, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) == 0);
    close(peer);
    CHECK(reaches(ours, TCP_CLOSE));
    CHECK(relay_dir_source_dead(ours));
    close(ours);

    /* Closed in order both ways (the peer's FIN, then ours, acknowledged) with bytes still
     * unread: TCP_CLOSE too, but the bytes before the FIN must still go. Not dead. */
    tcp_pair(&peer, &ours);
    CHECK(send(peer, "abc", 3, 0) == 3);
    CHECK(shutdown(peer, SHUT_WR) == 0);
    CHECK(reaches(ours, TCP_CLOSE_WAIT));
    CHECK(!relay_dir_source_dead(ours));  /* half-closed */
    CHECK(shutdown(ours, SHUT_WR) == 0);
    CHECK(reaches(ours, TCP_CLOSE));
    CHECK(!relay_dir_source_dead(ours));
    char buf[8];
    CHECK(recv(ours, buf, sizeof(buf), 0) == 3);
    close(peer);
    close(ours);

    /* Not a socket at all: not dead (nothing to say about it). */
    CHECK(!relay_dir_source_dead(-1));
}

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

    source_dead_checks();
    return check_summary();
}

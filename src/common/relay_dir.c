#include "relay_dir.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "log.h"

bool relay_dir_source_dead(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0 || ti.tcpi_state != TCP_CLOSE)
        return false;
    /* TCP_CLOSE is also where an orderly close ends (the peer's FIN queued behind bytes we
     * have not read, our own FIN sent and acknowledged): those bytes must still go. A
     * reset or a timeout leaves an error as well. Reading it clears it, and it matters no
     * more: the connection is closed for it. */
    int err = 0;
    len = sizeof(err);
    return getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0;
}

const char *relay_dir_state_name(enum relay_dir_state s)
{
    switch (s) {
    case RELAY_DIR_OPEN:
        return "open";
    case RELAY_DIR_EOF:
        return "eof";
    case RELAY_DIR_FIN_SENT:
        return "fin_sent";
    }
    return "?";
}

void relay_dir_set(enum relay_dir_state *state, enum relay_dir_state next, const char *mod,
                   const char *kind, unsigned long id, const char *dir)
{
    if (next <= *state)
        return;
    /* Checked first: a busy relay changes state twice per direction per connection, and
     * formatting a line nobody prints would cost more than the move itself. */
    if (log_get_level() <= LOGL_DEBUG)
        log_debug(mod, "%s %lu %s: %s -> %s", kind, id, dir, relay_dir_state_name(*state),
                  relay_dir_state_name(next));
    *state = next;
}

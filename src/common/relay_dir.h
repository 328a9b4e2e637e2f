/* One direction of a relayed connection, as OpenSSH's nchan.c keeps a channel's input and
 * output: open, then the source's EOF (FIN) was seen, then the FIN was passed on to the
 * destination. Both relays (splice_relay.c, bridge.c) keep one per direction and move it
 * only through relay_dir_set(), which logs every transition at debug, so a connection's
 * half-close can be followed in the log and EOF is never confused with a close. */
#ifndef PORTMUX_RELAY_DIR_H
#define PORTMUX_RELAY_DIR_H

#include <stdbool.h>

enum relay_dir_state {
    RELAY_DIR_OPEN = 0,   /* bytes may come */
    RELAY_DIR_EOF,        /* the source sent FIN: no more bytes; what is held still goes */
    RELAY_DIR_FIN_SENT,   /* all of it went, and the FIN was passed on: direction done */
};

/* Moves *state forward to next (never back: a repeated or older state is ignored) and
 * logs "<kind> <id> <dir>: <old> -> <new>" at debug under log module mod. */
void relay_dir_set(enum relay_dir_state *state, enum relay_dir_state next, const char *mod,
                   const char *kind, unsigned long id, const char *dir);

const char *relay_dir_state_name(enum relay_dir_state s);

/* Whether the TCP connection on fd is dead: reset by its peer, or given up on by the
 * kernel (retransmissions or keepalives unanswered). A relay that has paused reading fd
 * (its destination is full) hears of neither, as nothing watches fd meanwhile; its owner
 * asks this of a connection that has not moved for a while. A FIN, even one that ended
 * the connection in both directions, is not dead: the bytes before it still go. One
 * getsockopt for a live socket; a dead one's pending error is read (and so cleared). */
bool relay_dir_source_dead(int fd);

#endif

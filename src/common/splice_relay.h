/* Socket <-> socket relay on pipes (direct mode): splice(2) moves the payload through a
 * pipe per direction, so bytes never enter user space (two syscalls per chunk, no copies,
 * no evbuffer memory). Backpressure is the pipe itself: when the destination cannot take
 * more, reading from the source stops until it is writable again, so at most
 * SPLICE_RELAY_PIPE_SIZE bytes per direction wait, in the kernel. Pipes come from a small
 * pool and go back to it whenever they are empty, so an idle connection holds none.
 *
 * Half-close as OpenSSH's nchan.c does it: each direction has its relay_dir state; a FIN
 * from one side becomes shutdown(SHUT_WR) on the other once the pipe drained, and the
 * relay ends when both directions are done, or at once on an error.
 *
 * Side 0 is the public socket, side 1 the target: the target's socket may still be
 * connecting when the relay starts (a non-blocking connect); the relay knows it reached
 * the target when a byte moves to or from it, or (rarely, off the hot path) by asking the
 * socket. This is the one place that decides "is the target connected?". */
#ifndef PORTMUX_SPLICE_RELAY_H
#define PORTMUX_SPLICE_RELAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proxy_header.h"

struct event_base;
struct splice_relay;

struct splice_relay_hooks {
    /* n bytes were read from side d (0 public, 1 target). */
    void (*on_bytes)(int d, size_t n, void *arg);
    /* How much side d may read now, at most room: a rate limit's share. 0 throttles the
     * direction until read_wait_ns() says. NULL: no limit (with read_wait_ns). */
    size_t (*read_room)(int d, size_t room, void *arg);
    /* Nanoseconds until side d may read a useful chunk again (clamped by the relay). */
    uint64_t (*read_wait_ns)(int d, void *arg);
    /* The target is known to be connected (once). May be NULL. */
    void (*on_connected)(void *arg);
    /* The relay ended by itself: both directions done (err 0), or an error (err is the
     * errno). reached: the target had been connected. The relay and both sockets are
     * freed right after this returns. Not called by splice_relay_free(). */
    void (*on_close)(int err, bool reached, void *arg);
    /* The log module the owner's lines go under (half-close transitions, at debug);
     * NULL: "splice". */
    const char *log_module;
};

/* Relays fd0 (public) and fd1 (target; connected says whether its connect completed).
 * header (len bytes, at most SPLICE_RELAY_HEADER_MAX; a PROXY protocol header) goes to
 * the target before any relayed byte. Takes ownership of both descriptors, also on
 * failure (NULL: both closed). */
struct splice_relay *splice_relay_new(struct event_base *base, int fd0, int fd1,
                                      bool connected, const unsigned char *header,
                                      size_t len, const struct splice_relay_hooks *hooks,
                                      void *arg);
/* Closes both sockets at once, without calling the hooks. NULL-safe. */
void splice_relay_free(struct splice_relay *r);

/* Whether the target was reached: 1 connected, 0 still connecting, -1 failed (errno says
 * why). */
int splice_relay_target_state(struct splice_relay *r);

/* Whether a socket nothing reads is dead (reset, see relay_dir_source_dead): the source
 * of a direction that waits on a full destination, or of one that has had its FIN (a peer
 * that sent FIN, then RST, to a target that ignores half-closes held its connection, and
 * the mapping's place, for ever). Nothing else would notice. Asks the kernel only about
 * such sockets. */
bool splice_relay_unwatched_source_dead(const struct splice_relay *r);

#define SPLICE_RELAY_HEADER_MAX PROXY_HEADER_MAX

#endif

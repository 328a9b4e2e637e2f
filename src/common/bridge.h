/* Joins one mux stream to one socket bufferevent, on both sides of the tunnel: the
 * server's public socket <-> stream, the client's stream <-> dialled socket.
 *
 * Socket reads become Data as far as the stream's window allows (reading pauses while
 * the window is shut); received Data goes into the socket's output and is given back to
 * the peer as WindowUpdate only as the socket drains it, so a stalled reader stalls only
 * its own stream and nothing buffers beyond one window. Half-close both ways: socket EOF
 * -> ShutWrite once the input is sent; ShutWrite -> shutdown(SHUT_WR) once the output has
 * drained. The stream closes when both directions are done, or at once on an error. */
#ifndef PORTMUX_BRIDGE_H
#define PORTMUX_BRIDGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bufferevent;
struct bufferevent_rate_limit_group;
struct mux_stream;
struct bridge;

struct bridge_hooks {
    /* Bytes moved: to_stream = socket -> tunnel, to_socket = tunnel -> socket (written). */
    void (*on_bytes)(size_t to_stream, size_t to_socket, void *arg);
    /* The bridge finished by itself (both directions done, an error, the stream gone) and
     * is freed right after this returns. Not called by bridge_free(). */
    void (*on_close)(const char *why, void *arg);
    /* The log module the owner's lines go under (half-close transitions, at debug);
     * NULL: "bridge". */
    const char *log_module;
};

/* Joins an opened stream (ConnectResponse ok) and a connected socket bufferevent. Takes
 * ownership of bev (freed with the bridge) and of the application's reference to st.
 * Sets TCP_NODELAY. NULL on allocation failure (bev and st are then untouched). */
struct bridge *bridge_new(struct mux_stream *st, struct bufferevent *bev,
                          const struct bridge_hooks *hooks, void *arg);

/* Closes the socket and the stream at once, without calling the hooks. NULL-safe. */
void bridge_free(struct bridge *b);

/* Puts the socket into rate-limit group g (moving it out of any other), or out of every
 * group when g is NULL; while in one, the socket is read only as fast as g allows.
 * Returns 0, or -1 when libevent refused. */
int bridge_set_rate_group(struct bridge *b, struct bufferevent_rate_limit_group *g);

uint64_t bridge_bytes_to_stream(const struct bridge *b);
uint64_t bridge_bytes_to_socket(const struct bridge *b);

/* Bytes from the stream that wait here for the socket to take them (its reader lags). */
size_t bridge_bytes_waiting(const struct bridge *b);

/* Whether the socket is dead (reset, see relay_dir_source_dead) while nothing reads it:
 * reading paused (the stream's window or the tunnel is full), or over (it sent its FIN).
 * Nothing else would notice. Asks the kernel only about such a socket. */
bool bridge_unwatched_socket_dead(const struct bridge *b);

/* Sets TCP_NODELAY on fd (a best effort: errors are ignored). */
void bridge_set_nodelay(int fd);

#endif

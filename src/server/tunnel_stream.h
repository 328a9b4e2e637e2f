/* One public connection carried through a tunnel session, on the server side. Its life:
 *
 *   pending   ConnectRequest sent; the stream, the public socket and the connect_timeout
 *             timer are held here until the ConnectResponse. When the client's Hello
 *             asked for optimistic data, the PROXY header and the socket's first bytes
 *             already go as Data (within the stream's window) while the client dials
 *   bridged   ConnectResponse ok: a bridge owns the socket and the stream, this object
 *             keeps the mapping's accounting and the session's counters
 *   flushing  the session went away while bridged: the bridge delivers what it holds to
 *             the public socket, no longer counted in any session
 *
 * and one end function (tstream_end in tunnel_stream.c) from whichever state. The session (in
 * tunnel_server.c) holds its streams in a struct tunnel_stream_set and never touches a
 * stream's fields. */
#ifndef PORTMUX_TUNNEL_STREAM_H
#define PORTMUX_TUNNEL_STREAM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include <event2/util.h>

struct event_base;
struct mapping;
struct mux_session;
struct tunnel_stream;

/* A session's streams and the counters /api/clients shows. Embedded in the session. */
struct tunnel_stream_set {
    TAILQ_HEAD(, tunnel_stream) streams;
    size_t nstreams;              /* all, pending included (the limit counts these) */
    size_t nestablished;          /* bridged to their target (what /api/clients shows) */
    uint64_t bytes_in;            /* stream bytes from the client */
    uint64_t bytes_out;           /* stream bytes to the client */
    const char *name;             /* the client's name, for log lines (not owned) */
};

void tunnel_stream_set_init(struct tunnel_stream_set *set, const char *name);

/* Call after mux_session_free() of the set's session: the streams still there are bridges
 * delivering their last bytes (flushing); they leave the set, which is then empty. */
void tunnel_stream_set_detach(struct tunnel_stream_set *set);

/* Carries public connection fd (owned from here, on every path) of tunnel mapping m:
 * opens a stream on mux and waits connect_timeout seconds for its ConnectResponse. set
 * NULL (no session for the client) ends it at once, counted failed. */
void tunnel_stream_open(struct tunnel_stream_set *set, struct mux_session *mux,
                        struct event_base *base, struct mapping *m, evutil_socket_t fd,
                        int connect_timeout);

/* Accounts public connection fd of m as opened and failed, and closes it: the tunnel
 * refused it before any stream (client not connected, stream limit). */
void tunnel_stream_refuse(struct mapping *m, evutil_socket_t fd);

#endif

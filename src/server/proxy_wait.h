/* Connections from a trusted balancer (config trusted_proxies) waiting for the PROXY
 * protocol header that names the client behind them. A listener hands such a connection
 * here at accept; once the header is read (and nothing after it) the connection goes back
 * to the listener's own accept path with the client's address as its source, so the
 * per-source limits, allow_from and the logs see the client instead of the balancer.
 *
 * Each listener owns one set (struct proxy_waits); freeing it closes what still waits. */
#ifndef PORTMUX_PROXY_WAIT_H
#define PORTMUX_PROXY_WAIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <event2/util.h>

struct event_base;
struct config;

/* How long a balancer has to send its header (it sends it with the connection's first
 * segment; this is for one that does not, so it cannot hold a descriptor for long). */
#define PROXY_WAIT_SECONDS 5

/* The header is in: fd (still non-blocking, positioned after the header) now belongs to
 * the callee. src is the client the header names, or the balancer itself for a header
 * naming nobody (a health check). */
typedef void (*proxy_waits_done_fn)(evutil_socket_t fd, const struct sockaddr *src,
                                    socklen_t srclen, void *arg);

struct proxy_waits;

/* what names the listener in log lines ("tunnel", "port 10080", "api"); refused counts
 * the connections closed without a usable header (may be NULL). */
struct proxy_waits *proxy_waits_new(struct event_base *base, const char *what,
                                    proxy_waits_done_fn done, void *arg, uint64_t *refused);

/* Closes every connection still waiting, then frees pw. NULL is fine. */
void proxy_waits_free(struct proxy_waits *pw);

/* Takes fd, accepted from peer (a trusted balancer), and waits for its header; at most
 * max connections wait at once (fd is closed when that many already do). done may run
 * from here when the header is already in. Returns 0, or -1 when fd was closed. */
int proxy_waits_add(struct proxy_waits *pw, evutil_socket_t fd, const struct sockaddr *peer,
                    socklen_t peerlen, size_t max);

/* Connections waiting now. */
size_t proxy_waits_count(const struct proxy_waits *pw);

/* True when sa lies in trusted_proxies (never when the list is empty). */
bool proxy_waits_trusted(const struct config *cfg, const struct sockaddr *sa);

#endif

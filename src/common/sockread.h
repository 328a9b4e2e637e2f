/* Large reads for socket bufferevents.
 *
 * A libevent 2.1 workaround (LIBEVENT_VERSION_NUMBER < 2.2): libevent 2.1 reads at most
 * 4 KiB per wake-up (EVBUFFER_MAX_READ in buffer.c), which costs an epoll round and a
 * syscall per 4 KiB on a bulk stream. Called from a read callback, sockread_more() takes
 * what else is already waiting in the kernel in large readv() calls, straight into the
 * bufferevent's input -- which means lifting the freeze libevent keeps on that input
 * outside its own reads. libevent 2.2 has evbuffer_set_max_read() for exactly this:
 * built against it, sockread_set_large_io() raises that limit and sockread_more() does
 * nothing. Remove the 2.1 half when 2.1 is no longer a target. */
#ifndef PORTMUX_SOCKREAD_H
#define PORTMUX_SOCKREAD_H

#include <stddef.h>
#include <sys/types.h>

struct bufferevent;
struct evbuffer;

/* Bulk reads go in pieces of this size: one piece fills one 64 KiB evbuffer chain (the
 * allocation includes the chain's own header), so no chain holds more than a tunnel Data
 * frame carries and the mux sends whole chains without copying (see mux_stream_write). */
#define SOCKREAD_CHUNK (64 * 1024 - 128)

/* Reads up to limit more bytes from a plain socket bufferevent (never a TLS one: it would
 * bypass the decryption). Returns the bytes added; 0 when none were waiting, or when the
 * input holds under 4 KiB (libevent's read then emptied the socket already). EOF and
 * errors are left for libevent's own next read to report. */
size_t sockread_more(struct bufferevent *bev, size_t limit);

/* One readv() of up to want bytes from fd onto the end of buf (which must not be frozen
 * there), without libevent's FIONREAD first. Returns the bytes read, 0 at EOF, or -1 with
 * errno (EAGAIN: nothing waiting; ENOMEM: no room could be reserved). */
ssize_t sockread_into(struct evbuffer *buf, int fd, size_t want);

/* Raises the bufferevent's per-wake-up read and write caps (16 KiB by default) so bulk
 * transfers move in large chunks; TLS bufferevents benefit too. */
void sockread_set_large_io(struct bufferevent *bev);

#endif

#include "sockread.h"

#include <errno.h>
#include <sys/uio.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#define SOCKREAD_LARGE_IO (256 * 1024)

ssize_t sockread_into(struct evbuffer *buf, int fd, size_t want)
{
    struct evbuffer_iovec vec[2];
    int nvec = evbuffer_reserve_space(buf, (ev_ssize_t)want, vec, 2);
    if (nvec <= 0) {
        errno = ENOMEM;
        return -1;
    }
    struct iovec iov[2];
    size_t room = 0;
    for (int i = 0; i < nvec; i++) {
        size_t k = vec[i].iov_len < want - room ? vec[i].iov_len : want - room;
        iov[i].iov_base = vec[i].iov_base;
        iov[i].iov_len = k;
        room += k;
    }
    ssize_t n = readv(fd, iov, nvec);
    size_t left = n > 0 ? (size_t)n : 0;
    for (int i = 0; i < nvec; i++) {
        vec[i].iov_len = left < iov[i].iov_len ? left : iov[i].iov_len;
        left -= vec[i].iov_len;
    }
    evbuffer_commit_space(buf, vec, nvec);
    return n;
}

#if LIBEVENT_VERSION_NUMBER >= 0x02020000
/* libevent reads large chunks itself once told (evbuffer_set_max_read). */
size_t sockread_more(struct bufferevent *bev, size_t limit) { return 0; }

void sockread_set_large_io(struct bufferevent *bev)
{
    bufferevent_set_max_single_read(bev, SOCKREAD_LARGE_IO);
    bufferevent_set_max_single_write(bev, SOCKREAD_LARGE_IO);
    evbuffer_set_max_read(bufferevent_get_input(bev), SOCKREAD_LARGE_IO);
}
#else /* libevent 2.1: the workaround */

/* What libevent 2.1's own read takes at most per wake-up (EVBUFFER_MAX_READ). */
#define SOCKREAD_LIBEVENT_MAX_READ 4096

/* One readv of up to want bytes. Returns the bytes read (0 on EOF, EAGAIN or an error);
 * *full says whether the kernel may hold more (the read filled all it was offered). */
static size_t sockread_chunk(int fd, struct evbuffer *in, size_t want, int *full)
{
    ssize_t n = sockread_into(in, fd, want);
    *full = n > 0 && (size_t)n == want;
    return n > 0 ? (size_t)n : 0;
}

size_t sockread_more(struct bufferevent *bev, size_t limit)
{
    int fd = (int)bufferevent_getfd(bev);
    if (fd < 0)
        return 0;
    struct evbuffer *in = bufferevent_get_input(bev);
    /* libevent's read just before us took min(FIONREAD, 4 KiB): with less than that in
     * the input the socket had nothing more, and a readv now would only say EAGAIN (one
     * wasted syscall per small message, three per request on a tunnel). */
    if (evbuffer_get_length(in) < SOCKREAD_LIBEVENT_MAX_READ)
        return 0;
    /* A socket bufferevent keeps its input's end frozen outside its own read (only it may
     * add there); we are its read, so lift the freeze for the duration, as it does. */
    evbuffer_unfreeze(in, 0);
    size_t total = 0;
    int full = 1;
    while (full && total < limit) {
        size_t want = limit - total < SOCKREAD_CHUNK ? limit - total : SOCKREAD_CHUNK;
        total += sockread_chunk(fd, in, want, &full);
    }
    evbuffer_freeze(in, 0);
    return total;
}

void sockread_set_large_io(struct bufferevent *bev)
{
    bufferevent_set_max_single_read(bev, SOCKREAD_LARGE_IO);
    bufferevent_set_max_single_write(bev, SOCKREAD_LARGE_IO);
}
#endif

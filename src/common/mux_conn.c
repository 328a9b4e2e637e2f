/* One tunnel connection over a bufferevent; see mux_conn.h. */
#include "mux_conn.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/dns.h>

#include "sockread.h"
#include "tls_bev.h"

/* Stop reading a tunnel whose output grew this far (only control frames go past the
 * soft limit, so a healthy peer never gets here). */
#define MUX_CONN_OUT_HARD_LIMIT (4u * MUX_OUT_SOFT_LIMIT)
/* Frames taken per read wake-up beyond libevent's 4 KiB (see sockread.h). */
#define MUX_CONN_READ_MORE (256u * 1024u)
/* The staging pipe of zero-copy Data holds one frame; a socket's pages may be partly
 * filled, so it gets room for more pages than a frame's 16. */
#define MUX_CONN_PIPE_SIZE (256 * 1024)
/* Room for a Data frame's header (frame header + conn_id). */
#define MUX_CONN_SPLICE_HDR_MAX 16

struct mux_conn {
    struct bufferevent *bev;
    struct mux_session *mux;
    struct event *ka_timer;       /* KeepAlive every heartbeat interval */
    const struct mux_conn_hooks *hooks;
    void *arg;
    bool tls;
    bool read_paused;             /* by the output's hard limit, until it drains */
    bool closing;                 /* flushing the last frames before close */
    /* Zero-copy Data (plaintext only; mux_session_set_splice): a frame's header and its
     * payload, staged in the pipe, go to the socket ahead of the bufferevent's output.
     * While some of them wait for room, the bufferevent's writing is held and our own
     * write event finishes them. */
    int pipe[2];                  /* -1 until the first zero-copy frame */
    size_t staged;                /* payload bytes in the pipe */
    uint8_t hdr[MUX_CONN_SPLICE_HDR_MAX];
    size_t hdr_len, hdr_off;      /* the header part not yet sent */
    struct event *splice_write;   /* EV_WRITE while staged bytes wait for room */
    struct timeval idle;          /* the write timeout while they wait (0: none) */
    int splice_errno;             /* a send failed: reported from splice_write */
    bool bev_write_held;
};

static bool mux_conn_splice_busy(const struct mux_conn *conn);

static void mux_conn_read_cb(struct bufferevent *bev, void *arg)
{
    struct mux_conn *conn = arg;
    if (conn->closing)
        return;
    if (!conn->tls)
        sockread_more(bev, MUX_CONN_READ_MORE); /* tls_bev reads its socket side itself */
    int rc = mux_session_input(conn->mux, bufferevent_get_input(bev));
    if (rc < 0 || rc == MUX_STOPPED) {
        conn->hooks->on_stop(conn, rc, conn->arg);
        return;
    }
    if (evbuffer_get_length(bufferevent_get_output(bev)) > MUX_CONN_OUT_HARD_LIMIT) {
        /* The peer sends but does not read: stop taking its input until it does. */
        bufferevent_disable(bev, EV_READ);
        conn->read_paused = true;
    }
    if (conn->hooks->on_input)
        conn->hooks->on_input(conn, conn->arg);
}

static void mux_conn_write_cb(struct bufferevent *bev, void *arg)
{
    struct mux_conn *conn = arg;
    if (conn->closing) {
        if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
            conn->hooks->on_flushed(conn, conn->arg);
        return;
    }
    mux_session_output_drained(conn->mux);
    if (evbuffer_get_length(bufferevent_get_output(bev)) == 0 && !mux_conn_splice_busy(conn))
        mux_session_splice_ready(conn->mux);
    if (conn->read_paused) {
        conn->read_paused = false;
        bufferevent_enable(bev, EV_READ);
    }
}

/* ---- zero-copy Data ---- */

static bool mux_conn_splice_busy(const struct mux_conn *conn)
{
    return conn->staged > 0 || conn->hdr_off < conn->hdr_len || conn->splice_errno != 0;
}

static bool mux_conn_splice_ready(void *arg)
{
    struct mux_conn *conn = arg;
    return !conn->closing && !mux_conn_splice_busy(conn);
}

static ssize_t mux_conn_splice_stage(void *arg, int fd, size_t max)
{
    struct mux_conn *conn = arg;
    if (conn->pipe[0] < 0) {
        if (pipe2(conn->pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
            conn->pipe[0] = conn->pipe[1] = -1;
            return -1;
        }
        (void)fcntl(conn->pipe[1], F_SETPIPE_SZ, MUX_CONN_PIPE_SIZE); /* best effort */
    }
    ssize_t n = splice(fd, NULL, conn->pipe[1], NULL, max, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    if (n > 0)
        conn->staged = (size_t)n;
    return n;
}

/* Sends what waits: the header, then the staged payload. Returns true when all went. */
static bool mux_conn_splice_flush(struct mux_conn *conn)
{
    int fd = (int)bufferevent_getfd(conn->bev);
    while (conn->hdr_off < conn->hdr_len) {
        ssize_t w = send(fd, conn->hdr + conn->hdr_off, conn->hdr_len - conn->hdr_off,
                         MSG_MORE | MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0)
            goto blocked;
        conn->hdr_off += (size_t)w;
    }
    while (conn->staged > 0) {
        ssize_t w = splice(conn->pipe[0], NULL, fd, NULL, conn->staged,
                           SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        if (w == 0)
            errno = EPIPE; /* the pipe holds staged bytes: 0 would be a broken state */
        if (w <= 0)
            goto blocked;
        conn->staged -= (size_t)w;
    }
    return true;
blocked:
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
        conn->splice_errno = errno ? errno : EPIPE;
    return false;
}

static void mux_conn_splice_write_cb(evutil_socket_t fd, short what, void *arg);

/* Points the write event at the socket (a connect by host name makes it late). */
static void mux_conn_splice_bind(struct mux_conn *conn)
{
    evutil_socket_t fd = bufferevent_getfd(conn->bev);
    if (event_get_fd(conn->splice_write) != fd)
        event_assign(conn->splice_write, bufferevent_get_base(conn->bev), fd, EV_WRITE,
                     mux_conn_splice_write_cb, conn);
}

/* Until what waits is sent, the bufferevent must not write: its bytes come after. */
static void mux_conn_splice_wait(struct mux_conn *conn)
{
    mux_conn_splice_bind(conn); /* never pending here: it fires once per wait */
    if (!conn->bev_write_held) {
        bufferevent_disable(conn->bev, EV_WRITE);
        conn->bev_write_held = true;
    }
    if (conn->splice_errno) /* reported from the event, never from inside the session */
        event_active(conn->splice_write, EV_WRITE, 0);
    else
        event_add(conn->splice_write, conn->idle.tv_sec ? &conn->idle : NULL);
}

static void mux_conn_splice_send(void *arg, const uint8_t *hdr, size_t hlen, size_t n)
{
    struct mux_conn *conn = arg;
    memcpy(conn->hdr, hdr, hlen);
    conn->hdr_len = hlen;
    conn->hdr_off = 0;
    if (!mux_conn_splice_flush(conn))
        mux_conn_splice_wait(conn);
}

static void mux_conn_splice_write_cb(evutil_socket_t fd, short what, void *arg)
{
    struct mux_conn *conn = arg;
    if (conn->splice_errno || (what & EV_TIMEOUT)) {
        if (conn->splice_errno)
            EVUTIL_SET_SOCKET_ERROR(conn->splice_errno);
        conn->hooks->on_event(conn, BEV_EVENT_WRITING |
                                        (conn->splice_errno ? BEV_EVENT_ERROR : BEV_EVENT_TIMEOUT),
                              conn->arg);
        return; /* conn may be gone */
    }
    if (!mux_conn_splice_flush(conn)) {
        mux_conn_splice_wait(conn);
        return;
    }
    conn->bev_write_held = false;
    struct evbuffer *out = bufferevent_get_output(conn->bev);
    if (conn->closing && evbuffer_get_length(out) == 0) {
        conn->hooks->on_flushed(conn, conn->arg);
        return; /* conn may be gone */
    }
    bufferevent_enable(conn->bev, EV_WRITE);
    mux_session_splice_ready(conn->mux);
}

static const struct mux_splice_ops mux_conn_splice_ops = {
    .ready = mux_conn_splice_ready,
    .stage = mux_conn_splice_stage,
    .send = mux_conn_splice_send,
};

static void mux_conn_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct mux_conn *conn = arg;
    conn->hooks->on_event(conn, what, conn->arg);
}

static void mux_conn_keepalive_cb(evutil_socket_t fd, short what, void *arg)
{
    struct mux_conn *conn = arg;
    mux_session_send_keepalive(conn->mux);
}

static struct bufferevent *mux_conn_bev_new(struct event_base *base, evutil_socket_t fd,
                                            SSL *ssl, enum bufferevent_ssl_state state,
                                            int options)
{
    if (!ssl) {
        struct bufferevent *bev = bufferevent_socket_new(base, fd, options);
        if (!bev && fd >= 0)
            evutil_closesocket(fd);
        return bev;
    }
    struct bufferevent *bev = tls_bev_new(base, fd, ssl, state, options);
    if (!bev) {
        SSL_free(ssl);
        if (fd >= 0)
            evutil_closesocket(fd);
    }
    return bev;
}

struct mux_conn *mux_conn_new(struct event_base *base, evutil_socket_t fd, SSL *ssl,
                              enum bufferevent_ssl_state state, int bev_options,
                              enum mux_role role, const struct mux_session_callbacks *mcb,
                              const struct mux_conn_hooks *hooks, void *arg)
{
    struct mux_conn *conn = calloc(1, sizeof(*conn));
    if (!conn) {
        SSL_free(ssl);
        if (fd >= 0)
            evutil_closesocket(fd);
        return NULL;
    }
    conn->hooks = hooks;
    conn->arg = arg;
    conn->tls = ssl != NULL;
    conn->pipe[0] = conn->pipe[1] = -1;
    conn->bev = mux_conn_bev_new(base, fd, ssl, state, bev_options | BEV_OPT_CLOSE_ON_FREE);
    if (!conn->bev)
        goto fail;
    conn->mux = mux_session_new(role, bufferevent_get_output(conn->bev), mcb, arg);
    conn->ka_timer = event_new(base, -1, EV_PERSIST, mux_conn_keepalive_cb, conn);
    if (!conn->mux || !conn->ka_timer)
        goto fail;
    if (!conn->tls) {
        /* The descriptor may come later (mux_conn_connect_hostname): the event is bound
         * to it at first use, see mux_conn_splice_bind. */
        conn->splice_write = event_new(base, -1, 0, mux_conn_splice_write_cb, conn);
        if (!conn->splice_write)
            goto fail;
        mux_session_set_splice(conn->mux, &mux_conn_splice_ops, conn);
    }
    bufferevent_setcb(conn->bev, mux_conn_read_cb, mux_conn_write_cb, mux_conn_event_cb, conn);
    /* The write callback (drained below half the soft limit) is what lets streams that
     * stopped at the soft limit send again. */
    bufferevent_setwatermark(conn->bev, EV_WRITE, MUX_OUT_SOFT_LIMIT / 2, 0);
    sockread_set_large_io(conn->bev);
    bufferevent_enable(conn->bev, EV_READ | EV_WRITE);
    return conn;
fail:
    mux_conn_free(conn);
    return NULL;
}

void mux_conn_free(struct mux_conn *conn)
{
    if (!conn)
        return;
    mux_session_free(conn->mux);
    if (conn->ka_timer)
        event_free(conn->ka_timer);
    if (conn->splice_write)
        event_free(conn->splice_write);
    if (conn->pipe[0] >= 0) {
        close(conn->pipe[0]);
        close(conn->pipe[1]);
    }
    if (conn->bev)
        bufferevent_free(conn->bev);
    free(conn);
}

int mux_conn_connect_hostname(struct mux_conn *conn, struct evdns_base *dns,
                              const char *host, uint16_t port)
{
    return bufferevent_socket_connect_hostname(tls_bev_socket(conn->bev), dns, AF_UNSPEC,
                                               host, port);
}

struct mux_session *mux_conn_mux(const struct mux_conn *conn) { return conn->mux; }

struct bufferevent *mux_conn_bev(const struct mux_conn *conn) { return conn->bev; }

bool mux_conn_is_tls(const struct mux_conn *conn) { return conn->tls; }

void mux_conn_start_keepalive(struct mux_conn *conn, int every_s, int idle_s)
{
    struct timeval idle = {idle_s, 0};
    struct timeval every = {every_s, 0};
    /* Silence either way is death: nothing received, or our output not moving. */
    bufferevent_set_timeouts(conn->bev, &idle, &idle);
    conn->idle = idle;
    event_add(conn->ka_timer, &every);
}

int mux_conn_send_json(struct mux_conn *conn, uint8_t type, json_t *j)
{
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    int rc = -1;
    if (text)
        rc = mux_session_send_json(conn->mux, type, text, strlen(text));
    free(text);
    json_decref(j);
    return rc;
}

void mux_conn_hold_read(struct mux_conn *conn) { bufferevent_disable(conn->bev, EV_READ); }

void mux_conn_resume_read(struct mux_conn *conn)
{
    bufferevent_enable(conn->bev, EV_READ);
    if (evbuffer_get_length(bufferevent_get_input(conn->bev)) > 0)
        mux_conn_read_cb(conn->bev, conn);
}

bool mux_conn_close_after_flush(struct mux_conn *conn)
{
    conn->closing = true;
    bufferevent_disable(conn->bev, EV_READ);
    return evbuffer_get_length(bufferevent_get_output(conn->bev)) == 0 &&
           !mux_conn_splice_busy(conn);
}

bool mux_conn_closing(const struct mux_conn *conn) { return conn->closing; }

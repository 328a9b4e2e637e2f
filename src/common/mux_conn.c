/* One tunnel connection over a bufferevent; see mux_conn.h. */
#include "mux_conn.h"

#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/dns.h>

#include "sockread.h"
#include "tls_bev.h"

/* Stop reading a tunnel whose output grew this far (only control frames go past the
 * soft limit, so a healthy peer never gets here). */
#define MUX_CONN_OUT_HARD_LIMIT (4u * MUX_OUT_SOFT_LIMIT)
/* Frames taken per read wake-up beyond libevent's 4 KiB (see sockread.h). */
#define MUX_CONN_READ_MORE (256u * 1024u)

struct mux_conn {
    struct bufferevent *bev;
    struct mux_session *mux;
    struct event *ka_timer;       /* KeepAlive every heartbeat interval */
    const struct mux_conn_hooks *hooks;
    void *arg;
    bool tls;
    bool read_paused;             /* by the output's hard limit, until it drains */
    bool closing;                 /* flushing the last frames before close */
};

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
    if (conn->read_paused) {
        conn->read_paused = false;
        bufferevent_enable(bev, EV_READ);
    }
}

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
    conn->bev = mux_conn_bev_new(base, fd, ssl, state, bev_options | BEV_OPT_CLOSE_ON_FREE);
    if (!conn->bev)
        goto fail;
    conn->mux = mux_session_new(role, bufferevent_get_output(conn->bev), mcb, arg);
    conn->ka_timer = event_new(base, -1, EV_PERSIST, mux_conn_keepalive_cb, conn);
    if (!conn->mux || !conn->ka_timer)
        goto fail;
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
    return evbuffer_get_length(bufferevent_get_output(conn->bev)) == 0;
}

bool mux_conn_closing(const struct mux_conn *conn) { return conn->closing; }

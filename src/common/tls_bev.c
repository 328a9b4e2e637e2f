#include "tls_bev.h"

#include "sockread.h"

/* Sealed records waiting for the socket: OpenSSL seals no more above HIGH, and resumes
 * below LOW, so the tunnel's own output limits still see the backlog. */
#define TLS_BEV_SEALED_LOW (128u * 1024u)
#define TLS_BEV_SEALED_HIGH (512u * 1024u)

#if LIBEVENT_VERSION_NUMBER < 0x02020000
/* A libevent 2.1 workaround (see sockread.h): the filter's socket side must be read with
 * sockread_more() before OpenSSL opens what arrived, so its read callback -- libevent's
 * own, private to bufferevent_openssl.c -- is wrapped. libevent installs one callback
 * while the handshake runs and another once it is done; they are the same functions for
 * every TLS bufferevent, so one saved copy of each serves all (the loop is
 * single-threaded). With libevent 2.2, sockread_set_large_io() on the socket side sets
 * evbuffer_set_max_read() instead and none of this is compiled. */
#define TLS_BEV_WRAP_READS 1
/* What one wake-up of the socket side takes before OpenSSL opens it. */
#define TLS_BEV_READ_MORE (256u * 1024u)
static bufferevent_data_cb tls_bev_handshakecb; /* while the handshake runs */
static bufferevent_data_cb tls_bev_readcb;      /* once it is done */

static void tls_bev_open_readcb(struct bufferevent *sock, void *filter)
{
    sockread_more(sock, TLS_BEV_READ_MORE);
    tls_bev_readcb(sock, filter);
}

/* libevent installs its read and write callbacks on the socket side when the handshake
 * completes (in either direction); this wraps the new read callback then. A failed
 * handshake may have freed the bufferevents: the socket side's callbacks are NULL then
 * (libevent holds a reference for the duration of this callback). */
static void tls_bev_handshake_step(struct bufferevent *sock, void *filter)
{
    tls_bev_handshakecb(sock, filter);
    bufferevent_data_cb readcb, writecb;
    bufferevent_event_cb eventcb;
    void *arg;
    bufferevent_getcb(sock, &readcb, &writecb, &eventcb, &arg);
    if (!readcb || readcb == tls_bev_handshake_step || readcb == tls_bev_open_readcb)
        return;
    tls_bev_readcb = readcb;
    bufferevent_setcb(sock, tls_bev_open_readcb, writecb, eventcb, arg);
}
#endif

#define TLS_BEV_CIPHERSUITES \
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
#define TLS_BEV_CIPHERS                                                                   \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"                          \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"                          \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"

int tls_bev_ctx_defaults(SSL_CTX *ctx)
{
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_PRIORITIZE_CHACHA);
    if (SSL_CTX_set_ciphersuites(ctx, TLS_BEV_CIPHERSUITES) != 1 ||
        SSL_CTX_set_cipher_list(ctx, TLS_BEV_CIPHERS) != 1)
        return -1;
    return 0;
}

struct bufferevent *tls_bev_new(struct event_base *base, evutil_socket_t fd, SSL *ssl,
                                enum bufferevent_ssl_state state, int options)
{
    struct bufferevent *sock = bufferevent_socket_new(base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (!sock)
        return NULL;
    struct bufferevent *bev = bufferevent_openssl_filter_new(base, sock, ssl, state, options);
    if (!bev) {
        bufferevent_setfd(sock, -1); /* the caller keeps fd */
        bufferevent_free(sock);
        return NULL;
    }
#ifdef TLS_BEV_WRAP_READS
    bufferevent_event_cb eventcb;
    void *filter;
    bufferevent_getcb(sock, &tls_bev_handshakecb, NULL, &eventcb, &filter);
    bufferevent_setcb(sock, tls_bev_handshake_step, tls_bev_handshake_step, eventcb, filter);
#endif
    sockread_set_large_io(sock);
    bufferevent_setwatermark(sock, EV_WRITE, TLS_BEV_SEALED_LOW, TLS_BEV_SEALED_HIGH);
    /* A peer that drops the TCP connection without close_notify is an EOF, not an error. */
    bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
    return bev;
}

struct bufferevent *tls_bev_socket(struct bufferevent *bev)
{
    struct bufferevent *sock = bufferevent_get_underlying(bev);
    return sock ? sock : bev;
}

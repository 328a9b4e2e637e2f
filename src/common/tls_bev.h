/* TLS bufferevents that move bulk data in large chunks.
 *
 * bufferevent_openssl_socket_new() does one SSL_read per wake-up and one write(2) per TLS
 * record: an epoll round, two read(2)s and a write(2) for every 16 KiB record (the count
 * is in bench/RESULTS.md, "Measurements behind the code"). Here OpenSSL runs
 * as a filter on a socket bufferevent instead: records are sealed into the socket
 * bufferevent's output and leave in one writev of up to 256 KiB, and the socket side is
 * read with sockread_more() before OpenSSL opens what arrived. */
#ifndef PORTMUX_TLS_BEV_H
#define PORTMUX_TLS_BEV_H

#include <openssl/ssl.h>

#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>

/* The settings every portmux TLS context shares: TLS 1.2 at least, no compression, no
 * renegotiation, and AES-128-GCM preferred (then AES-256-GCM, then ChaCha20 for peers
 * without AES instructions): on AES-NI hardware AES-128-GCM seals a record with ~30% less
 * work than AES-256, which OpenSSL would otherwise pick first. ssh -R's aes128-gcm is the
 * same cipher. Returns 0, or -1 when OpenSSL refuses the lists. */
int tls_bev_ctx_defaults(SSL_CTX *ctx);

/* A TLS bufferevent over fd (-1: connect later through tls_bev_socket()). options must
 * hold BEV_OPT_CLOSE_ON_FREE: freeing the result frees ssl, the socket bufferevent and
 * fd. Dirty shutdowns (no close_notify) report EOF. On failure returns NULL and fd and
 * ssl stay the caller's. */
struct bufferevent *tls_bev_new(struct event_base *base, evutil_socket_t fd, SSL *ssl,
                                enum bufferevent_ssl_state state, int options);

/* The socket bufferevent under a TLS one (for connecting and DNS errors); bev itself
 * when it is a plain socket bufferevent. */
struct bufferevent *tls_bev_socket(struct bufferevent *bev);

#endif

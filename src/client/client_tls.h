/* The client's TLS: a context that verifies the server (chain against --ca, or the
 * system store, and the host name), optionally with a client certificate (mTLS). */
#ifndef PORTMUX_CLIENT_TLS_H
#define PORTMUX_CLIENT_TLS_H

#include <stdbool.h>
#include <stddef.h>

#include <openssl/ssl.h>

struct bufferevent;

/* TLS 1.2 minimum. ca: PEM bundle, or NULL for the system store. cert/key: client
 * certificate, both or neither. NULL + err on failure. */
SSL_CTX *client_tls_ctx_new(const char *ca, const char *cert, const char *key, char *err,
                            size_t errlen);

/* An SSL for one connection that checks the certificate names server_name (a host name
 * or an IP literal) and sends it as SNI. NULL on failure. */
SSL *client_tls_ssl_new(SSL_CTX *ctx, const char *server_name);

/* True when the server asked for a client certificate and this context had none
 * (mutual TLS without --cert): a retry cannot succeed. */
bool client_tls_cert_requested(const SSL *ssl);

/* After a TLS error on bev: writes the reason ("certificate verify failed (...)" or
 * OpenSSL's reason) into buf, or "" when there was no TLS error. Returns true when the
 * failure is about certificates (a verification or authentication failure, which a retry
 * will not fix). */
bool client_tls_failure(struct bufferevent *bev, SSL *ssl, char *buf, size_t len);

#endif

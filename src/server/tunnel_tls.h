/* The tunnel port's TLS context: built from tunnel.tls.* at start and again on SIGHUP
 * (a renewed certificate at the same paths is served to new sessions), with warnings an
 * operator should see before clients fail (an expired or nearly expired certificate, a
 * private key every user may read). */
#ifndef PORTMUX_TUNNEL_TLS_H
#define PORTMUX_TUNNEL_TLS_H

#include <stdbool.h>
#include <stddef.h>

#include <openssl/ssl.h>

struct config;

/* A server context from cfg's cert_file, key_file and client_ca; NULL with err set. */
SSL_CTX *tunnel_tls_new(const struct config *cfg, char *err, size_t errlen);

/* True when the two serve different certificates. */
bool tunnel_tls_differs(SSL_CTX *a, SSL_CTX *b);

/* Logs a warning for a certificate expired, not yet valid or ending within 14 days, and
 * for a key file others may read. */
void tunnel_tls_check(const struct config *cfg, SSL_CTX *ctx);

#endif

/* One error path for building an OpenSSL context, shared by the server and the client. */
#ifndef PORTMUX_TLS_ERROR_H
#define PORTMUX_TLS_ERROR_H

#include <stddef.h>

#include <openssl/ssl.h>

/* Writes "PREFIXWHAT FILE: <OpenSSL reason>" into err, clears OpenSSL's error queue, frees
 * ctx (NULL-safe) and returns NULL, so callers can `return tls_ctx_fail(...)`. */
SSL_CTX *tls_ctx_fail(SSL_CTX *ctx, char *err, size_t errlen, const char *prefix,
                      const char *what, const char *file);

#endif

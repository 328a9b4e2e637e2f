#include "tls_error.h"

#include <stdio.h>

#include <openssl/err.h>

SSL_CTX *tls_ctx_fail(SSL_CTX *ctx, char *err, size_t errlen, const char *prefix,
                      const char *what, const char *file)
{
    unsigned long e = ERR_peek_last_error();
    const char *reason = e ? ERR_reason_error_string(e) : NULL;
    snprintf(err, errlen, "%s%s %s: %s", prefix, what, file, reason ? reason : "failed");
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
}

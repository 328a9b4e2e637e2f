/* See tunnel_tls.h. */
#include "tunnel_tls.h"

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/asn1.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "config.h"
#include "log.h"
#include "tls_bev.h"
#include "tls_error.h"

#define TUNNEL_TLS_MOD "tunnel"
#define TUNNEL_TLS_WARN_DAYS 14

SSL_CTX *tunnel_tls_new(const struct config *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx)
        return tls_ctx_fail(ctx, err, errlen, "tunnel TLS: ", "cannot create context for", cfg->tls_cert_file);
    if (tls_bev_ctx_defaults(ctx) != 0)
        return tls_ctx_fail(ctx, err, errlen, "tunnel TLS: ", "cannot set the ciphers for", cfg->tls_cert_file);
    if (SSL_CTX_use_certificate_chain_file(ctx, cfg->tls_cert_file) != 1)
        return tls_ctx_fail(ctx, err, errlen, "tunnel TLS: ", "cannot load certificate", cfg->tls_cert_file);
    if (SSL_CTX_use_PrivateKey_file(ctx, cfg->tls_key_file, SSL_FILETYPE_PEM) != 1)
        return tls_ctx_fail(ctx, err, errlen, "tunnel TLS: ", "cannot load key", cfg->tls_key_file);
    if (SSL_CTX_check_private_key(ctx) != 1)
        return tls_ctx_fail(ctx, err, errlen, "tunnel TLS: ", "key does not match certificate", cfg->tls_key_file);
    if (cfg->tls_client_ca && cfg->tls_client_ca[0]) {
        STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(cfg->tls_client_ca);
        if (!names || SSL_CTX_load_verify_locations(ctx, cfg->tls_client_ca, NULL) != 1) {
            sk_X509_NAME_pop_free(names, X509_NAME_free);
            return tls_ctx_fail(ctx, err, errlen, "tunnel TLS: ", "cannot load client CA", cfg->tls_client_ca);
        }
        SSL_CTX_set_client_CA_list(ctx, names);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    }
    return ctx;
}

bool tunnel_tls_differs(SSL_CTX *a, SSL_CTX *b)
{
    X509 *ca = SSL_CTX_get0_certificate(a), *cb = SSL_CTX_get0_certificate(b);
    return !ca || !cb || X509_cmp(ca, cb) != 0;
}

void tunnel_tls_check(const struct config *cfg, SSL_CTX *ctx)
{
    X509 *cert = SSL_CTX_get0_certificate(ctx);
    if (cert) {
        const ASN1_TIME *not_after = X509_get0_notAfter(cert);
        int day, sec;
        if (X509_cmp_current_time(X509_get0_notBefore(cert)) > 0)
            log_warn(TUNNEL_TLS_MOD, "%s is not valid yet: clients refuse it until it is",
                     cfg->tls_cert_file);
        else if (X509_cmp_current_time(not_after) < 0)
            log_warn(TUNNEL_TLS_MOD, "%s has expired: every client refuses it; renew it and "
                                     "reload (SIGHUP)", cfg->tls_cert_file);
        else if (ASN1_TIME_diff(&day, &sec, NULL, not_after) == 1 &&
                 day < TUNNEL_TLS_WARN_DAYS)
            log_warn(TUNNEL_TLS_MOD, "%s expires in %d day(s): renew it and reload (SIGHUP)",
                     cfg->tls_cert_file, day);
    }
    struct stat st;
    if (cfg->tls_key_file && stat(cfg->tls_key_file, &st) == 0 && (st.st_mode & S_IROTH))
        log_warn(TUNNEL_TLS_MOD, "%s (the private key) is readable by every user (mode %03o): "
                                 "chmod o-r", cfg->tls_key_file, (unsigned)(st.st_mode & 0777));
}

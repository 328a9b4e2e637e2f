/* Client-side TLS set-up and error reporting. */
#include "client_tls.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <event2/bufferevent_ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "netaddr.h"
#include "regular_file.h"
#include "tls_bev.h"
#include "tls_error.h"

/* The SSL ex_data slot where cert_requested_cb marks a connection whose server asked
 * for a client certificate we do not have; -1 until the first context is made. */
static int client_tls_req_idx = -1;

/* OpenSSL calls this only when the server sends a CertificateRequest and no certificate
 * was configured: answering "none" lets the handshake go on (the server decides), and
 * the mark lets the client say why the server then hangs up. */
static int cert_requested_cb(SSL *ssl, X509 **x509, EVP_PKEY **pkey)
{
    (void)x509;
    (void)pkey;
    if (client_tls_req_idx >= 0)
        SSL_set_ex_data(ssl, client_tls_req_idx, (void *)1);
    return 0;
}

bool client_tls_cert_requested(const SSL *ssl)
{
    return ssl && client_tls_req_idx >= 0 && SSL_get_ex_data(ssl, client_tls_req_idx) != NULL;
}

SSL_CTX *client_tls_ctx_new(const char *ca, const char *cert, const char *key, char *err,
                            size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        return tls_ctx_fail(ctx, err, errlen, "", "cannot create TLS context", "");
    if (tls_bev_ctx_defaults(ctx) != 0)
        return tls_ctx_fail(ctx, err, errlen, "", "cannot set the TLS ciphers", "");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    /* OpenSSL would block reading a FIFO named here: refuse what is not a file first.
     * Opened, not only looked at: a key this user may not read (a 0600 root key under
     * the unit's DynamicUser) then says "Permission denied", where OpenSSL says "system
     * lib". */
    const struct {
        const char *flag, *path;
    } files[] = {{"--ca", ca}, {"--cert", cert}, {"--key", key}};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        const char *why = NULL;
        int fd = files[i].path ? regular_file_open(files[i].path, &why) : -1;
        if (fd >= 0)
            close(fd);
        if (why) {
            snprintf(err, errlen, "cannot load %s %s: %s", files[i].flag, files[i].path, why);
            SSL_CTX_free(ctx);
            return NULL;
        }
    }
    if (ca) {
        if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
            return tls_ctx_fail(ctx, err, errlen, "", "cannot load --ca", ca);
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        return tls_ctx_fail(ctx, err, errlen, "", "cannot load the system CA store", "");
    }
    if (cert && SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
        return tls_ctx_fail(ctx, err, errlen, "", "cannot load --cert", cert);
    if (key && SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
        return tls_ctx_fail(ctx, err, errlen, "", "cannot load --key", key);
    if (cert && SSL_CTX_check_private_key(ctx) != 1)
        return tls_ctx_fail(ctx, err, errlen, "", "--key does not match --cert", key);
    if (!cert) {
        if (client_tls_req_idx < 0)
            client_tls_req_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
        SSL_CTX_set_client_cert_cb(ctx, cert_requested_cb);
    }
    return ctx;
}

SSL *client_tls_ssl_new(SSL_CTX *ctx, const char *server_name)
{
    SSL *ssl = SSL_new(ctx);
    if (!ssl)
        return NULL;
    X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    int ok;
    if (netaddr_is_ip_literal(server_name)) {
        ok = X509_VERIFY_PARAM_set1_ip_asc(param, server_name);
    } else {
        ok = X509_VERIFY_PARAM_set1_host(param, server_name, 0) &&
             SSL_set_tlsext_host_name(ssl, server_name);
    }
    if (!ok) {
        SSL_free(ssl);
        return NULL;
    }
    return ssl;
}

bool client_tls_failure(struct bufferevent *bev, SSL *ssl, char *buf, size_t len)
{
    const char *reason = NULL;
    unsigned long e;
    while ((e = bufferevent_get_openssl_error(bev)) != 0) {
        if (!reason)
            reason = ERR_reason_error_string(e);
    }
    buf[0] = '\0';
    long vr = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
    if (vr != X509_V_OK) {
        snprintf(buf, len, "certificate verify failed (%s)", X509_verify_cert_error_string(vr));
        return true;
    }
    if (!reason)
        return false;
    snprintf(buf, len, "%s", reason);
    /* The server refused our certificate (or asked for one we lack). */
    return strstr(reason, "certificate") != NULL || strstr(reason, "unknown ca") != NULL;
}

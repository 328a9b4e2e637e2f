#include "secret.h"

#include <string.h>

#include <openssl/crypto.h>
#include <openssl/sha.h>

bool secret_equal(const char *want, const char *given, size_t len)
{
    unsigned char a[SHA256_DIGEST_LENGTH], b[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)want, strlen(want), a);
    SHA256((const unsigned char *)given, len, b);
    return CRYPTO_memcmp(a, b, sizeof(a)) == 0;
}

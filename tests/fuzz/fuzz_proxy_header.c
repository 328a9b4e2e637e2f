/* libFuzzer target for proxy_header_parse, the bytes a trusted balancer sends first. It
 * checks what proxy_wait relies on: the verdict on a prefix never contradicts the verdict
 * on the whole (a "need more" is not taken back by more bytes, a length once known stays),
 * no "need more" once PROXY_HEADER_PEEK bytes are seen, and a header that names a client
 * writes back (proxy_header_build) to one that names the same client. */
#include "proxy_header.h"

#include <netinet/in.h>

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "netaddr.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fuzz_fail(const char *what)
{
    fprintf(stderr, "fuzz_proxy_header: %s\n", what);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct proxy_header_info info, again;
    long whole = proxy_header_parse(data, size, &info);
    if (whole == 0 && size >= PROXY_HEADER_PEEK)
        fuzz_fail("needs more after PROXY_HEADER_PEEK bytes");
    if (whole > 0 && whole < 16 && data[0] != 'P')
        fuzz_fail("a v2 header shorter than its fixed part");
    size_t step = size > 64 ? size / 64 : 1;
    for (size_t i = 0; i < size; i += step) {
        long part = proxy_header_parse(data, i, &again);
        if (part < 0 && whole >= 0)
            fuzz_fail("a prefix refused, the whole accepted");
        if (part > 0 && part != whole)
            fuzz_fail("the length changed with more bytes");
    }
    /* proxy_header_build writes ::ffff:a.b.c.d as IPv4, so beside a plain IPv6 address it
     * writes UNKNOWN: such headers do not come back as they went, by design. */
    const struct sockaddr_in6 *src6 = (const struct sockaddr_in6 *)&info.src;
    const struct sockaddr_in6 *dst6 = (const struct sockaddr_in6 *)&info.dst;
    bool mapped = info.src.ss_family == AF_INET6 && (IN6_IS_ADDR_V4MAPPED(&src6->sin6_addr) ||
                                                     IN6_IS_ADDR_V4MAPPED(&dst6->sin6_addr));
    if (whole > 0 && !mapped &&
        (info.src.ss_family == AF_INET || info.src.ss_family == AF_INET6)) {
        unsigned char buf[PROXY_HEADER_MAX];
        for (int version = 1; version <= 2; version++) {
            int n = proxy_header_build(version, (const struct sockaddr *)&info.src,
                                       (const struct sockaddr *)&info.dst, buf);
            if (n <= 0 || proxy_header_parse(buf, (size_t)n, &again) != n)
                fuzz_fail("a header we write does not read back");
            /* The same client, though ::ffff:a.b.c.d comes back as a.b.c.d. */
            uint8_t ka[16], kb[16];
            if (netaddr_key((const struct sockaddr *)&again.src, ka) != 0 ||
                netaddr_key((const struct sockaddr *)&info.src, kb) != 0 ||
                memcmp(ka, kb, 16) != 0 ||
                ((const struct sockaddr_in *)&again.src)->sin_port !=
                    ((const struct sockaddr_in *)&info.src)->sin_port)
                fuzz_fail("the client's address changed on the way");
        }
    }
    return 0;
}

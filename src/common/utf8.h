/* UTF-8 text a peer's bytes may have cut or spoiled, made fit for a JSON string. Pure. */
#ifndef PORTMUX_UTF8_H
#define PORTMUX_UTF8_H

#include <stddef.h>

/* Copies src into dst (cap bytes, cap >= 1; always terminated) with every byte that does
 * not begin or belong to a well-formed UTF-8 sequence (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF) replaced by '?', and a sequence the cap would cut
 * left out whole. jansson refuses such strings, so an error message that quotes a peer's
 * bytes (a key, a parse error's text) could not otherwise be sent. Returns dst's length. */
size_t utf8_clean_copy(char *dst, size_t cap, const char *src);

#endif

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

/* Length of the well-formed UTF-8 sequence at s (n >= 1 bytes left), 0 when it is none. */
size_t utf8_seq_len(const unsigned char *s, size_t n);

/* True when the well-formed sequence at s is a C1 control (U+0080-U+009F: CSI, OSC, ST
 * and their kin, which some terminals act on as they do on ESC). */
static inline int utf8_is_c1(const unsigned char *s) { return s[0] == 0xC2 && s[1] < 0xA0; }

#endif

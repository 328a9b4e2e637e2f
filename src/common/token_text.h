/* What a token may be made of, for every place one is read (config, environment, command
 * line): printable ASCII without spaces. A token read from a secret file often ends in a
 * newline; taken as it is, it never matches what the peer sends, and every request fails
 * with nothing to say why. */
#ifndef PORTMUX_TOKEN_TEXT_H
#define PORTMUX_TOKEN_TEXT_H

#include <stdbool.h>

/* True when s is empty or every byte is in 0x21..0x7e. */
bool token_text_ok(const char *s);

#endif

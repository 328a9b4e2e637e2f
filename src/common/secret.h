/* Comparison of secrets (tokens) that takes the same time whatever the inputs. */
#ifndef PORTMUX_SECRET_H
#define PORTMUX_SECRET_H

#include <stdbool.h>
#include <stddef.h>

/* True when the len bytes at given equal the NUL-terminated want. Both are hashed first,
 * so the time taken reveals neither a matching prefix nor the token's length. */
bool secret_equal(const char *want, const char *given, size_t len);

#endif

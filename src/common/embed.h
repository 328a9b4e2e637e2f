/* Files compiled into the binary by cmake/embed.cmake. */
#ifndef PORTMUX_EMBED_H
#define PORTMUX_EMBED_H

#include <stddef.h>

struct embedded_file {
    const char *path;          /* relative to the embedded folder, '/'-separated */
    const unsigned char *data; /* NUL-terminated for convenience; len excludes it */
    size_t len;
};

#endif

/* Files an operator names (the config, certificates, keys, CAs): a FIFO, a device or a
 * directory at such a path must give a clear error, never a read that blocks the process
 * until someone writes to it (a FIFO) or returns endless bytes (/dev/zero). */
#ifndef PORTMUX_REGULAR_FILE_H
#define PORTMUX_REGULAR_FILE_H

/* Opens path for reading without blocking on what it turns out to be. Returns a blocking
 * descriptor (O_CLOEXEC) of a regular file, or -1 with *why set to a static message
 * ("is a directory", "not a regular file", or strerror's). */
int regular_file_open(const char *path, const char **why);

/* NULL when path names a regular file (symlinks followed), else why not (as above).
 * For paths a library opens itself (OpenSSL's *_file functions). */
const char *regular_file_check(const char *path);

#endif

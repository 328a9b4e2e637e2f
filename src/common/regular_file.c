#include "regular_file.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *regular_file_why(const struct stat *st)
{
    if (S_ISREG(st->st_mode))
        return NULL;
    return S_ISDIR(st->st_mode) ? "is a directory" : "not a regular file";
}

int regular_file_open(const char *path, const char **why)
{
    /* Looked at before it is opened: opening some devices does something. */
    if ((*why = regular_file_check(path)) != NULL)
        return -1;
    /* O_NONBLOCK: should it have become a FIFO meanwhile, opening it for reading would
     * otherwise wait for a writer; fstat below has the last word. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        *why = strerror(errno);
        return -1;
    }
    struct stat st;
    int flags;
    if (fstat(fd, &st) != 0 || (flags = fcntl(fd, F_GETFL)) < 0) {
        *why = strerror(errno);
        goto fail;
    }
    if ((*why = regular_file_why(&st)) != NULL)
        goto fail;
    if (fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
        *why = strerror(errno);
        goto fail;
    }
    return fd;
fail:
    close(fd);
    return -1;
}

const char *regular_file_check(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return strerror(errno);
    return regular_file_why(&st);
}

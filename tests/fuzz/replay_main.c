/* Runs a libFuzzer target over saved inputs without libFuzzer, so every build (gcc
 * included) replays the corpus and the regression inputs under ctest.
 *
 * Usage: fuzz_<name>_replay DIR|FILE...   Directories are read one level deep, in name
 * order; a missing directory runs nothing. A crash in the target is the failure. */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Reads the file into a buffer of exactly its size, so ASan sees any over-read.
 * Returns 0 or -1. */
static int replay_read_file(const char *path, uint8_t **out, size_t *out_len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        goto fail;
    struct stat st;
    if (fstat(fileno(f), &st) != 0)
        goto fail_close;
    size_t len = (size_t)st.st_size;
    uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL)
        goto fail_close;
    if (fread(buf, 1, len, f) != len) {
        free(buf);
        goto fail_close;
    }
    fclose(f);
    *out = buf;
    *out_len = len;
    return 0;
fail_close:
    fclose(f);
fail:
    fprintf(stderr, "replay: %s: %s\n", path, strerror(errno ? errno : EIO));
    return -1;
}

static int replay_file(const char *path)
{
    uint8_t *buf;
    size_t len;
    if (replay_read_file(path, &buf, &len) != 0)
        return -1;
    LLVMFuzzerTestOneInput(buf, len);
    free(buf);
    return 0;
}

static int replay_is_regular(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Replays every regular file in dir; adds the count to *ran. Returns 0 or -1. */
static int replay_dir(const char *dir, long *ran)
{
    struct dirent **names;
    int n = scandir(dir, &names, NULL, alphasort);
    if (n < 0) {
        fprintf(stderr, "replay: %s: %s\n", dir, strerror(errno));
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < n; i++) {
        size_t plen = strlen(dir) + 1 + strlen(names[i]->d_name) + 1;
        char *path = malloc(plen);
        if (path == NULL) {
            rc = -1;
        } else {
            snprintf(path, plen, "%s/%s", dir, names[i]->d_name);
            if (replay_is_regular(path)) {
                if (replay_file(path) == 0)
                    (*ran)++;
                else
                    rc = -1;
            }
            free(path);
        }
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv)
{
    long ran = 0;
    int rc = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            /* A target with no corpus yet is not an error. */
            fprintf(stderr, "replay: %s: %s (skipped)\n", argv[i], strerror(errno));
            continue;
        }
        if (S_ISDIR(st.st_mode)) {
            if (replay_dir(argv[i], &ran) != 0)
                rc = 1;
        } else if (replay_file(argv[i]) == 0) {
            ran++;
        } else {
            rc = 1;
        }
    }
    printf("replayed %ld inputs\n", ran);
    return rc;
}

/* token_text (what a token may be made of) and regular_file (files an operator names must
 * not block the reader): both pure enough to test here. */
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "regular_file.h"
#include "token_text.h"

static void test_token_text(void)
{
    CHECK(token_text_ok(""));
    CHECK(token_text_ok("tok-0123456789abcdef"));
    CHECK(token_text_ok("!~#$%&'()*+,./:;<=>?@[]^_`{|}"));
    CHECK(!token_text_ok("tok en"));
    CHECK(!token_text_ok("tok-0123456789abcdef\n"));
    CHECK(!token_text_ok("\ttok"));
    CHECK(!token_text_ok("tok\r"));
    CHECK(!token_text_ok("tok\x7f"));
    CHECK(!token_text_ok("tok\xc3\xa9")); /* UTF-8 is not what a peer's header carries */
}

static void test_regular_file(char *dir)
{
    char path[PATH_MAX];
    const char *why = NULL;
    snprintf(path, sizeof(path), "%s/plain", dir);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    fputs("x", f);
    fclose(f);
    int fd = regular_file_open(path, &why);
    CHECK(fd >= 0);
    if (fd >= 0) {
        /* A blocking descriptor: O_NONBLOCK was only for the open. */
        CHECK((fcntl(fd, F_GETFL) & O_NONBLOCK) == 0);
        char c;
        CHECK(read(fd, &c, 1) == 1 && c == 'x');
        close(fd);
    }
    CHECK(regular_file_check(path) == NULL);
    /* A FIFO with no writer: refused at once (a plain open would wait for ever). */
    snprintf(path, sizeof(path), "%s/fifo", dir);
    CHECK(mkfifo(path, 0600) == 0);
    CHECK(regular_file_open(path, &why) == -1 && strcmp(why, "not a regular file") == 0);
    CHECK(regular_file_check(path) && strcmp(regular_file_check(path), "not a regular file") == 0);
    CHECK(regular_file_open(dir, &why) == -1 && strcmp(why, "is a directory") == 0);
    CHECK(regular_file_check(dir) && strcmp(regular_file_check(dir), "is a directory") == 0);
    CHECK(regular_file_open("/dev/zero", &why) == -1 && strcmp(why, "not a regular file") == 0);
    snprintf(path, sizeof(path), "%s/missing", dir);
    CHECK(regular_file_open(path, &why) == -1 && strcmp(why, "No such file or directory") == 0);
    CHECK(regular_file_check(path) != NULL);
}

int main(void)
{
    char dir[] = "/tmp/portmux-regular-XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_token_text();
    test_regular_file(dir);
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    return check_summary();
}

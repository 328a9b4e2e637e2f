/* Unit tests for the logger's escaping (src/common/log.c): one line per message, whatever the
 * message holds. */
#include "check.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Runs one log_warn with stderr sent to a temporary file; returns what was written
 * (static buffer). */
static const char *capture(const char *fmt_arg)
{
    static char out[4096];
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    FILE *tmp = tmpfile();
    CHECK(saved >= 0 && tmp != NULL);
    dup2(fileno(tmp), STDERR_FILENO);
    log_warn("test", "client \"%s\" refused", fmt_arg);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    rewind(tmp);
    size_t n = fread(out, 1, sizeof(out) - 1, tmp);
    out[n] = '\0';
    fclose(tmp);
    return out;
}

static void test_control_bytes_escaped(void)
{
    const char *s = capture("evil\n2026-01-01T00:00:00Z INFO api forged\r\x1b[2J\x7f");
    /* One line, the newline only at its end. */
    CHECK(strchr(s, '\n') == s + strlen(s) - 1);
    CHECK(strchr(s, '\r') == NULL && strchr(s, '\x1b') == NULL && strchr(s, '\x7f') == NULL);
    CHECK(strstr(s, "client \"evil\\x0a2026-01-01T00:00:00Z INFO api forged\\x0d\\x1b[2J\\x7f\""
                    " refused") != NULL);
    /* Printable text and UTF-8 pass unchanged. */
    s = capture("b\xc3\xbcro-1");
    CHECK(strstr(s, "WARN test client \"b\xc3\xbcro-1\" refused\n") != NULL);
    /* UTF-8's C1 controls (CSI U+009B, OSC U+009D, ST U+009C) and bytes that are no UTF-8
     * (a lone 0x9b is CSI to an 8-bit terminal) are escaped; U+00A0 and up are not. */
    s = capture("x\xc2\x9b" "2J\xc2\x9d" "0;t\xc2\x9c|\x9b" "1m|\xc2\xa0|\xe2\x82\xac|\xff");
    CHECK(strstr(s, "client \"x\\xc2\\x9b2J\\xc2\\x9d0;t\\xc2\\x9c|\\x9b1m|\xc2\xa0|\xe2\x82\xac|"
                    "\\xff\" refused") != NULL);
}

static void test_long_message_cut_to_one_line(void)
{
    char big[3000];
    memset(big, '\n', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    const char *s = capture(big);
    size_t len = strlen(s);
    CHECK(len <= 1024 && len > 900);
    CHECK(strchr(s, '\n') == s + len - 1);
}

int main(void)
{
    test_control_bytes_escaped();
    test_long_message_cut_to_one_line();
    return check_summary();
}

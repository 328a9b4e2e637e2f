#include "log.h"

#include "utf8.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static enum log_level log_threshold = LOGL_INFO;

static const char *const log_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};

void log_set_level(enum log_level level) { log_threshold = level; }

enum log_level log_get_level(void) { return log_threshold; }

int log_level_parse(const char *s, enum log_level *out)
{
    static const char *const lower[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++) {
        if (strcmp(s, lower[i]) == 0) {
            *out = (enum log_level)i;
            return 0;
        }
    }
    return -1;
}

const char *log_level_name(enum log_level level)
{
    return (unsigned)level < 4 ? log_names[level] : "?";
}

/* Appends msg[0..mlen) to line from len on, at most up to cap. Control bytes (a peer's
 * newline, escape sequences, the C1 controls of UTF-8) and bytes that are not UTF-8
 * become \xNN, so no peer-supplied string can forge a line or drive a terminal. Returns
 * the new length. */
static size_t log_escape(char *line, size_t len, size_t cap, const char *msg, size_t mlen)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < mlen; i++) {
        const unsigned char *u = (const unsigned char *)msg + i;
        unsigned char c = *u;
        size_t k = c < 0x80 ? (c >= 0x20 && c != 0x7f) : utf8_seq_len(u, mlen - i);
        if (k > 1 && utf8_is_c1(u))
            k = 0;
        if (k > 0) {
            if (len + k > cap)
                break;
            memcpy(line + len, u, k);
            len += k;
            i += k - 1;
            continue;
        }
        if (len + 4 > cap)
            break;
        line[len++] = '\\';
        line[len++] = 'x';
        line[len++] = hex[c >> 4];
        line[len++] = hex[c & 15];
    }
    return len;
}

void log_msg(enum log_level level, const char *module, const char *fmt, ...)
{
    if (level < log_threshold)
        return;
    char line[1024];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = (int)strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%SZ ", &tm);
    n += snprintf(line + n, sizeof(line) - (size_t)n, "%s %s ", log_level_name(level), module);
    char msg[sizeof(line)];
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    /* A message longer than the line is cut, never split into two lines. */
    size_t len = log_escape(line, (size_t)n, sizeof(line) - 1, msg,
                            m < 0 ? 0 : (size_t)m < sizeof(msg) ? (size_t)m : sizeof(msg) - 1);
    line[len++] = '\n';
    /* One fwrite per line keeps lines whole when several threads (MHD) log. */
    fwrite(line, 1, len, stderr);
}

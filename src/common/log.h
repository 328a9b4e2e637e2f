/* Levelled log lines to stderr: "2026-01-01T12:00:00Z INFO module message". */
#ifndef PORTMUX_LOG_H
#define PORTMUX_LOG_H

enum log_level { LOGL_DEBUG = 0, LOGL_INFO, LOGL_WARN, LOGL_ERROR };

/* Sets the lowest level that is printed (default info). */
void log_set_level(enum log_level level);
enum log_level log_get_level(void);
/* Parses "debug|info|warn|error"; returns 0, or -1 for anything else. */
int log_level_parse(const char *s, enum log_level *out);
const char *log_level_name(enum log_level level);

/* One line: UTC timestamp, level, module, message. Never blocks on a full pipe for long:
 * stderr is line-buffered so journald and docker logs see whole lines. */
void log_msg(enum log_level level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_debug(mod, ...) log_msg(LOGL_DEBUG, mod, __VA_ARGS__)
#define log_info(mod, ...) log_msg(LOGL_INFO, mod, __VA_ARGS__)
#define log_warn(mod, ...) log_msg(LOGL_WARN, mod, __VA_ARGS__)
#define log_error(mod, ...) log_msg(LOGL_ERROR, mod, __VA_ARGS__)

#endif

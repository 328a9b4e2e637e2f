/* Failed dials: last_error per mapping and a rate-limited info line.
 *
 * Every public connection can fail its dial, so an unlimited line per failure would let
 * anyone who can connect fill the log; one line per mapping per 10 s with the count left
 * out keeps the reason visible at the default level and the log bounded. */
#include "mapping_dial.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include "log.h"
#include "mapping.h"

void mapping_dial_failed(struct mapping *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->dial.last_error, sizeof(m->dial.last_error), fmt, ap);
    va_end(ap);
    time_t now = time(NULL);
    m->dial.last_error_at = now;
    if (m->dial.log_at && now - m->dial.log_at < MAPPING_DIAL_LOG_SECONDS &&
        now >= m->dial.log_at) {
        m->dial.log_suppressed++;
        return;
    }
    if (m->dial.log_suppressed)
        log_info("mapping", "port %d: dial failed: %s (%llu more failed since the last line)",
                 m->rec.port, m->dial.last_error, (unsigned long long)m->dial.log_suppressed);
    else
        log_info("mapping", "port %d: dial failed: %s", m->rec.port, m->dial.last_error);
    m->dial.log_at = now;
    m->dial.log_suppressed = 0;
}

void mapping_dial_json(const struct mapping *m, json_t *o)
{
    char when[32];
    struct tm tm;
    time_t t = m->dial.last_error_at;
    if (!m->dial.last_error_at || !gmtime_r(&t, &tm)) {
        json_object_set_new(o, "last_error", json_null());
        json_object_set_new(o, "last_error_at", json_null());
        return;
    }
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    json_t *why = json_string(m->dial.last_error);
    json_object_set_new(o, "last_error", why ? why : json_string("(not valid UTF-8)"));
    json_object_set_new(o, "last_error_at", json_string(when));
}

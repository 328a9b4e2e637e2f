/* Abuse limits of the tunnel's Hello path (SPEC §4 "Abuse limits"), per source address:
 * after HELLO_LIMIT_FAILURES failed Hellos within HELLO_LIMIT_WINDOW_MS the source is
 * refused unchecked for HELLO_LIMIT_BLOCK_MS; and every log line a peer can trigger goes
 * through hello_limit_log (one per kind per source per HELLO_LIMIT_LOG_MS, with the count
 * of those suppressed). A source is an IPv4 address or an IPv6 /64, as in
 * netaddr_same_source. The table of sources
 * is bounded: at most max_sources entries, the least recently active one that is not
 * blocked evicted for a new source (so new addresses cannot wash a block out). Pure: the
 * caller passes the time. */
#ifndef PORTMUX_HELLO_LIMIT_H
#define PORTMUX_HELLO_LIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define HELLO_LIMIT_FAILURES 10
#define HELLO_LIMIT_WINDOW_MS 60000
#define HELLO_LIMIT_BLOCK_MS 60000
#define HELLO_LIMIT_LOG_MS 10000
/* Lines of one kind logged across all sources per HELLO_LIMIT_LOG_MS: with many source
 * addresses (an IPv6 prefix) the per-source limit alone would not bound the log. */
#define HELLO_LIMIT_LOG_GLOBAL 20
#define HELLO_LIMIT_DEFAULT_SOURCES 4096

/* Kinds of peer-triggered log lines. */
enum hello_log_kind {
    HELLO_LOG_BAD_HELLO,
    HELLO_LOG_AUTH_FAILED,
    HELLO_LOG_ALREADY_CONNECTED,
    HELLO_LOG_RATE_LIMITED,
    HELLO_LOG_TIMEOUT,
    HELLO_LOG_PROTOCOL,
    HELLO_LOG_TLS,
    HELLO_LOG_BLOCKED,          /* "N failed Hellos …: refused for 60 s" */
    HELLO_LOG_KINDS
};

struct hello_limit;

struct hello_limit *hello_limit_new(size_t max_sources);
void hello_limit_free(struct hello_limit *hl);

/* True while sa is blocked: its Hellos are refused without checking. */
bool hello_limit_blocked(struct hello_limit *hl, const struct sockaddr *sa, int64_t now_ms);
/* Records a failed Hello from sa. Returns true when this failure started a block. */
bool hello_limit_failure(struct hello_limit *hl, const struct sockaddr *sa, int64_t now_ms);
/* True when a line of this kind about sa may be logged now; *suppressed gets how many
 * were held back since the last one logged (and is reset). */
bool hello_limit_log(struct hello_limit *hl, const struct sockaddr *sa,
                     enum hello_log_kind kind, int64_t now_ms, uint64_t *suppressed);
/* Sources in the table (tests, metrics). */
size_t hello_limit_sources(const struct hello_limit *hl);

#endif

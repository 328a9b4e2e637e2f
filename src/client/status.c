/* portmux-client's live status block and exit summary (see status.h). */
#include "status.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/queue.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

/* Distinct targets tracked one by one; past this they share one row (bounded memory
 * whatever the server asks for). */
#define STATUS_TARGETS_MAX 256
/* Forwarding rows drawn at most; the rest are summed up in one line. */
#define STATUS_ROWS_MAX 12
/* Public ports remembered per target (more are counted). */
#define STATUS_PORTS_MAX 4
/* Rows left above the block for log lines; a smaller terminal gets no block. */
#define STATUS_MIN_SCROLL_ROWS 3
/* Rule, session, and at least one forwarding row. */
#define STATUS_MIN_HEIGHT 3
#define STATUS_LINE_MAX 512
#define STATUS_FRAME_MAX ((STATUS_ROWS_MAX + STATUS_NODES_MAX + 4) * (STATUS_LINE_MAX + 16) + 256)

enum status_state { ST_CONNECTING, ST_CONNECTED, ST_LOST, ST_RECONNECTING, ST_REFUSED };

struct status_target {
    TAILQ_ENTRY(status_target) link;
    char name[STATUS_TARGET_MAX + 1];   /* printable ASCII only */
    int ports[STATUS_PORTS_MAX];
    int nports;                         /* announced public ports (may exceed the array) */
    uint64_t active, total, failed;
    uint64_t bytes_in, bytes_out;
    char last_error[64];
};

/* An extra cluster node's session (status_node_add). */
struct status_node {
    TAILQ_ENTRY(status_node) link;
    struct status *s;
    char addr[STATUS_TARGET_MAX + 1];   /* printable ASCII only */
    enum status_state state;
    int attempt;
    char detail[200];
    struct timespec since, retry_at;
    double rtt_ms;
};

struct status {
    struct event_base *base;
    char host[280];            /* server host as shown in tcp://HOST:PORT */
    char server[300];          /* HOST:PORT of the tunnel endpoint */
    char name[72];
    bool tls;
    int fd;
    bool live;                 /* drawing the block */
    bool utf8;
    struct event *timer;
    struct event *winch;
    int rows, cols;
    int height;                /* rows the block occupies now (0 = none) */
    enum status_state state;
    int attempt;
    char detail[400];          /* why the session was lost or refused */
    struct timespec started, since, retry_at;
    double rtt_ms;
    char client_info[96];      /* "source api, takeovers 0, refused 0" or "" */
    TAILQ_HEAD(, status_target) targets;
    size_t ntargets;
    struct status_target *other;
    /* Rows a Notice left unlisted (status_mappings_prune): kept, not drawn, because a dial
     * in flight may hold the pointer; a later dial or announcement brings one back. */
    TAILQ_HEAD(, status_target) hidden;
    size_t nhidden;
    TAILQ_HEAD(, status_node) nodes;
    size_t nnodes;
    char frame[STATUS_FRAME_MAX];
    size_t frame_len;
};

/* ---- small formatting helpers ---- */

static double status_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double status_ts(const struct timespec *ts)
{
    return (double)ts->tv_sec + (double)ts->tv_nsec / 1e9;
}

static void status_fmt_bytes(uint64_t n, char *out, size_t len)
{
    static const char *const units[] = {"KiB", "MiB", "GiB", "TiB"};
    if (n < 1024) {
        snprintf(out, len, "%llu B", (unsigned long long)n);
        return;
    }
    double v = (double)n / 1024.0;
    int u = 0;
    while (v >= 1024.0 && u < 3) {
        v /= 1024.0;
        u++;
    }
    snprintf(out, len, "%.1f %s", v, units[u]);
}

static void status_fmt_duration(double secs, char *out, size_t len)
{
    unsigned long long t = secs > 0 ? (unsigned long long)secs : 0;
    unsigned long long d = t / 86400, h = t / 3600 % 24, m = t / 60 % 60, s = t % 60;
    if (d)
        snprintf(out, len, "%llud%02lluh%02llum", d, h, m);
    else if (h)
        snprintf(out, len, "%lluh%02llum%02llus", h, m, s);
    else if (m)
        snprintf(out, len, "%llum%02llus", m, s);
    else
        snprintf(out, len, "%llus", s);
}

/* Copies s, every byte outside printable ASCII replaced by '?'. */
static void status_printable(const char *s, char *out, size_t len)
{
    size_t i = 0;
    for (; s[i] && i + 1 < len; i++)
        out[i] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
    out[i] = '\0';
}

static bool status_env_utf8(void)
{
    /* The precedence setlocale(LC_CTYPE, "") would apply, without changing the locale. */
    const char *v = getenv("LC_ALL");
    if (!v || !v[0])
        v = getenv("LC_CTYPE");
    if (!v || !v[0])
        v = getenv("LANG");
    return v && (strcasestr(v, "utf-8") || strcasestr(v, "utf8"));
}

/* Cuts a line to fit cols-1 terminal columns (a full last column would wrap on some
 * terminals). Every multi-byte character we print is one column wide. */
static void status_fit(char *line, int cols)
{
    int used = 0;
    for (char *p = line; *p; p++) {
        if (((unsigned char)*p & 0xC0) == 0x80)
            continue;
        if (++used >= cols) {
            *p = '\0';
            return;
        }
    }
}

/* ---- frame buffer: one write() per redraw ---- */

static void frame_add(struct status *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void frame_add(struct status *s, const char *fmt, ...)
{
    size_t room = sizeof(s->frame) - s->frame_len;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(s->frame + s->frame_len, room, fmt, ap);
    va_end(ap);
    if (n > 0)
        s->frame_len += (size_t)n < room ? (size_t)n : room - 1;
}

/* Writes the frame; a terminal that fails (hung up) ends the block for good. */
static void frame_flush(struct status *s)
{
    size_t off = 0;
    while (off < s->frame_len) {
        ssize_t n = write(s->fd, s->frame + off, s->frame_len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            s->live = false;
            break;
        }
        off += (size_t)n;
    }
    s->frame_len = 0;
}

/* ---- the block's lines ---- */

static void status_rule(const struct status *s, char *out, size_t len)
{
    char up[32];
    const char *bar = s->utf8 ? "──" : "--";
    status_fmt_duration(status_now() - status_ts(&s->started), up, sizeof(up));
    /* A rule longer than the terminal is cut when drawn: truncation here is fine. */
    if (snprintf(out, len, "%s portmux-client %s %s server %s%s as \"%s\"%s%s%s %s up %s %s",
                 bar, PORTMUX_VERSION, bar, s->server, s->tls ? " (TLS)" : "", s->name,
                 s->client_info[0] ? " (" : "", s->client_info, s->client_info[0] ? ")" : "",
                 bar, up, bar) < 0)
        out[0] = '\0';
}

static void status_node_line(const struct status_node *n, char *out, size_t len)
{
    char dur[32];
    double now = status_now();
    int w = snprintf(out, len, "Node        %s  ", n->addr);
    if (w < 0 || (size_t)w >= len)
        return;
    out += w;
    len -= (size_t)w;
    switch (n->state) {
    case ST_CONNECTING:
    case ST_REFUSED:
        snprintf(out, len, "%s%s%s", n->state == ST_CONNECTING ? "connecting" : "refused",
                 n->detail[0] ? ": " : "", n->detail);
        return;
    case ST_CONNECTED:
        status_fmt_duration(now - status_ts(&n->since), dur, sizeof(dur));
        if (n->rtt_ms > 0)
            snprintf(out, len, "connected for %s, RTT %.2f ms", dur, n->rtt_ms);
        else
            snprintf(out, len, "connected for %s, RTT not measured yet", dur);
        return;
    case ST_LOST:
        snprintf(out, len, "disconnected: %s", n->detail);
        return;
    case ST_RECONNECTING: {
        double left = status_ts(&n->retry_at) - now;
        snprintf(out, len, "reconnecting in %.1f s (attempt %d)%s%s", left > 0 ? left : 0.0,
                 n->attempt, n->detail[0] ? ": " : "", n->detail);
        return;
    }
    }
}

static void status_session_line(const struct status *s, char *out, size_t len)
{
    char dur[32];
    double now = status_now();
    switch (s->state) {
    case ST_CONNECTING:
        snprintf(out, len, "Session     connecting to %s", s->server);
        return;
    case ST_CONNECTED:
        status_fmt_duration(now - status_ts(&s->since), dur, sizeof(dur));
        if (s->rtt_ms > 0)
            snprintf(out, len, "Session     connected for %s, RTT %.2f ms", dur, s->rtt_ms);
        else
            snprintf(out, len, "Session     connected for %s, RTT not measured yet", dur);
        return;
    case ST_LOST:
        snprintf(out, len, "Session     disconnected: %s", s->detail);
        return;
    case ST_RECONNECTING: {
        double left = status_ts(&s->retry_at) - now;
        snprintf(out, len, "Session     reconnecting in %.1f s (attempt %d)%s%s",
                 left > 0 ? left : 0.0, s->attempt, s->detail[0] ? ": " : "", s->detail);
        return;
    }
    case ST_REFUSED:
        snprintf(out, len, "Session     refused: %s", s->detail);
        return;
    }
}

/* "tcp://HOST:P" or "tcp://HOST:P1,P2" for the announced public ports; "tcp://HOST:?"
 * when the server did not say (a mapping created after this session began). */
static void status_public(const struct status *s, const struct status_target *t, char *out,
                          size_t len)
{
    int n = snprintf(out, len, "tcp://%s:", s->host);
    if (t->nports == 0) {
        snprintf(out + n, len - (size_t)n, "?");
        return;
    }
    int shown = t->nports < STATUS_PORTS_MAX ? t->nports : STATUS_PORTS_MAX;
    for (int i = 0; i < shown && (size_t)n < len; i++)
        n += snprintf(out + n, len - (size_t)n, "%s%d", i ? "," : "", t->ports[i]);
    if (t->nports > shown && (size_t)n < len)
        snprintf(out + n, len - (size_t)n, ",+%d", t->nports - shown);
}

static void status_target_line(const struct status *s, const struct status_target *t,
                               int width, char *out, size_t len)
{
    char pub[STATUS_TARGET_MAX + 32], left[2 * STATUS_TARGET_MAX + 64], in[24], outb[24];
    status_public(s, t, pub, sizeof(pub));
    snprintf(left, sizeof(left), "%s %s %s", pub, s->utf8 ? "→" : "->", t->name);
    status_fmt_bytes(t->bytes_in, in, sizeof(in));
    status_fmt_bytes(t->bytes_out, outb, sizeof(outb));
    /* Pad by columns: "→" is three bytes but one column. */
    int pad = width - ((int)strlen(left) - (s->utf8 ? 2 : 0));
    int n = snprintf(out, len, "Forwarding  %s%*s  active %llu  total %llu  in %s  out %s",
                     left, pad > 0 ? pad : 0, "", (unsigned long long)t->active,
                     (unsigned long long)t->total, in, outb);
    if (t->failed && n > 0 && (size_t)n < len)
        snprintf(out + n, len - (size_t)n, "  failed %llu (%s)", (unsigned long long)t->failed,
                 t->last_error);
}

/* ---- drawing ---- */

/* Rows the forwarding part wants: one per target (at most STATUS_ROWS_MAX, plus one line
 * summing up the rest), or one "nothing yet" line. */
static int status_wanted_rows(const struct status *s)
{
    if (s->ntargets == 0)
        return 1;
    return (int)s->ntargets <= STATUS_ROWS_MAX ? (int)s->ntargets : STATUS_ROWS_MAX + 1;
}

/* The block's height for this terminal; 0 when it does not fit. */
static int status_fit_height(const struct status *s)
{
    int h = 2 + (int)s->nnodes + status_wanted_rows(s);
    int room = s->rows - STATUS_MIN_SCROLL_ROWS;
    if (h > room)
        h = room;
    return h >= STATUS_MIN_HEIGHT ? h : 0;
}

/* Moves the scroll region's bottom to leave h rows for the block, keeping every log line
 * already on screen: growing scrolls the region up first (newlines at its bottom). */
static void status_set_height(struct status *s, int h)
{
    int grow = h - s->height;
    if (grow > 0) {
        for (int i = 0; i < grow; i++)
            frame_add(s, "\n");
        frame_add(s, "\033[%dA", grow);
    }
    frame_add(s, "\0337");
    for (int row = s->rows - s->height + 1; grow < 0 && row <= s->rows - h; row++)
        frame_add(s, "\033[%d;1H\033[2K", row);
    if (h > 0)
        frame_add(s, "\033[1;%dr", s->rows - h);
    else
        frame_add(s, "\033[r");
    frame_add(s, "\0338");
    s->height = h;
}

static void status_put_row(struct status *s, int i, char *line)
{
    status_fit(line, s->cols);
    frame_add(s, "\033[%d;1H\033[2K%s", s->rows - s->height + 1 + i, line);
}

static int status_left_width(const struct status *s, int nrows)
{
    char pub[STATUS_TARGET_MAX + 32];
    int width = 0, i = 0;
    const struct status_target *t;
    TAILQ_FOREACH(t, &s->targets, link) {
        if (i++ >= nrows)
            break;
        status_public(s, t, pub, sizeof(pub));
        /* Columns of "PUB → NAME" (or "PUB -> NAME"). */
        int w = (int)(strlen(pub) + strlen(t->name)) + (s->utf8 ? 3 : 4);
        width = w > width ? w : width;
    }
    return width;
}

static void status_put_targets(struct status *s, int first_row)
{
    char line[STATUS_LINE_MAX];
    int nrows = s->height - first_row, i = 0;
    if (s->ntargets == 0) {
        snprintf(line, sizeof(line), "Forwarding  nothing yet: no tunnel mapping for \"%s\" "
                 "announced or asked for", s->name);
        status_put_row(s, first_row, line);
        return;
    }
    /* The last row sums up what does not fit. */
    int shown = (int)s->ntargets > nrows ? nrows - 1 : nrows;
    int width = status_left_width(s, shown);
    const struct status_target *t;
    TAILQ_FOREACH(t, &s->targets, link) {
        if (i >= shown)
            break;
        status_target_line(s, t, width, line, sizeof(line));
        status_put_row(s, first_row + i++, line);
    }
    if (i < nrows && (size_t)i < s->ntargets) {
        snprintf(line, sizeof(line), "            %s and %zu more targets",
                 s->utf8 ? "…" : "...", s->ntargets - (size_t)i);
        status_put_row(s, first_row + i, line);
    }
}

static void status_draw(struct status *s)
{
    if (!s->live)
        return;
    char line[STATUS_LINE_MAX];
    int h = status_fit_height(s);
    if (h != s->height)
        status_set_height(s, h);
    if (s->height > 0) {
        frame_add(s, "\0337");
        status_rule(s, line, sizeof(line));
        status_put_row(s, 0, line);
        status_session_line(s, line, sizeof(line));
        status_put_row(s, 1, line);
        /* Node rows only when the whole block fits; a short terminal keeps the targets. */
        int row = 2;
        const struct status_node *n;
        TAILQ_FOREACH(n, &s->nodes, link) {
            if (s->height - row <= 1)
                break;
            status_node_line(n, line, sizeof(line));
            status_put_row(s, row++, line);
        }
        status_put_targets(s, row);
        frame_add(s, "\0338");
    }
    frame_flush(s);
}

/* Takes the block off the screen and gives every row back to scrolling. */
static void status_erase(struct status *s)
{
    if (!s->live || s->height == 0)
        return;
    frame_add(s, "\0337\033[r");
    for (int row = s->rows - s->height + 1; row <= s->rows; row++)
        frame_add(s, "\033[%d;1H\033[2K", row);
    frame_add(s, "\0338");
    s->height = 0;
    frame_flush(s);
}

static void status_read_size(struct status *s)
{
    struct winsize ws;
    s->rows = 24;
    s->cols = 80;
    if (ioctl(s->fd, TIOCGWINSZ, &ws) == 0 && ws.ws_row > 0 && ws.ws_col > 0) {
        s->rows = ws.ws_row;
        s->cols = ws.ws_col;
    }
}

static void status_timer_cb(evutil_socket_t fd, short what, void *arg) { status_draw(arg); }

/* Terminals reset the scroll region on a resize, and the old block moved with the text:
 * clear where it would now be and draw again. */
static void status_winch_cb(evutil_socket_t sig, short what, void *arg)
{
    struct status *s = arg;
    int old = s->height;
    status_read_size(s);
    frame_add(s, "\0337\033[r");
    for (int row = s->rows - old + 1; row <= s->rows; row++)
        frame_add(s, "\033[%d;1H\033[2K", row > 0 ? row : 1);
    frame_add(s, "\0338");
    s->height = 0;
    status_draw(s);
}

/* ---- life cycle ---- */

static bool status_terminal(int fd)
{
    const char *term = getenv("TERM");
    return isatty(fd) && term && term[0] && strcmp(term, "dumb") != 0;
}

static int status_start_live(struct status *s)
{
    struct timeval every = {1, 0};
    s->timer = event_new(s->base, -1, EV_PERSIST, status_timer_cb, s);
    s->winch = evsignal_new(s->base, SIGWINCH, status_winch_cb, s);
    if (!s->timer || !s->winch || event_add(s->timer, &every) != 0 ||
        event_add(s->winch, NULL) != 0)
        return -1;
    s->live = true;
    status_read_size(s);
    status_draw(s);
    return 0;
}

struct status *status_new(struct event_base *base, const struct status_opts *o)
{
    struct status *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->base = base;
    s->fd = o->out_fd;
    s->tls = o->tls;
    s->utf8 = status_env_utf8();
    TAILQ_INIT(&s->targets);
    TAILQ_INIT(&s->hidden);
    TAILQ_INIT(&s->nodes);
    char host[260];
    status_printable(o->server_host, host, sizeof(host));
    snprintf(s->host, sizeof(s->host), strchr(host, ':') ? "[%s]" : "%s", host);
    snprintf(s->server, sizeof(s->server), "%s:%u", s->host, (unsigned)o->server_port);
    status_printable(o->name, s->name, sizeof(s->name));
    clock_gettime(CLOCK_MONOTONIC, &s->started);
    s->since = s->started;
    if (status_terminal(s->fd) && status_start_live(s) != 0) {
        status_free(s);
        return NULL;
    }
    return s;
}

void status_free(struct status *s)
{
    if (!s)
        return;
    status_erase(s);
    if (s->timer)
        event_free(s->timer);
    if (s->winch)
        event_free(s->winch);
    struct status_target *t;
    while ((t = TAILQ_FIRST(&s->targets)) != NULL) {
        TAILQ_REMOVE(&s->targets, t, link);
        free(t);
    }
    while ((t = TAILQ_FIRST(&s->hidden)) != NULL) {
        TAILQ_REMOVE(&s->hidden, t, link);
        free(t);
    }
    struct status_node *n;
    while ((n = TAILQ_FIRST(&s->nodes)) != NULL) {
        TAILQ_REMOVE(&s->nodes, n, link);
        free(n);
    }
    free(s);
}

/* "N bytes in", with the size in units from 1 KiB on: "1048576 bytes in (1.0 MiB)". */
static void status_add_bytes(struct status *s, uint64_t n, const char *way)
{
    char human[24];
    status_fmt_bytes(n, human, sizeof(human));
    frame_add(s, "%llu bytes %s", (unsigned long long)n, way);
    if (n >= 1024)
        frame_add(s, " (%s)", human);
}

void status_finish(struct status *s)
{
    if (!s)
        return;
    uint64_t streams = 0, in = 0, out = 0;
    const struct status_target *t;
    TAILQ_FOREACH(t, &s->targets, link) {
        streams += t->total;
        in += t->bytes_in;
        out += t->bytes_out;
    }
    TAILQ_FOREACH(t, &s->hidden, link) {
        streams += t->total;
        in += t->bytes_in;
        out += t->bytes_out;
    }
    char up[32];
    status_fmt_duration(status_now() - status_ts(&s->started), up, sizeof(up));
    status_erase(s);
    frame_add(s, "portmux-client: up %s, %llu stream%s served, ", up,
              (unsigned long long)streams, streams == 1 ? "" : "s");
    status_add_bytes(s, in, "in");
    frame_add(s, ", ");
    status_add_bytes(s, out, "out");
    frame_add(s, "\n");
    frame_flush(s);
}

/* ---- session state ---- */

static void status_state(struct status *s, enum status_state st, const char *detail)
{
    s->state = st;
    snprintf(s->detail, sizeof(s->detail), "%s", detail ? detail : "");
    clock_gettime(CLOCK_MONOTONIC, &s->since);
    status_draw(s);
}

void status_connecting(struct status *s)
{
    if (s)
        status_state(s, ST_CONNECTING, NULL);
}

void status_connected(struct status *s)
{
    if (!s)
        return;
    s->rtt_ms = 0;
    status_state(s, ST_CONNECTED, NULL);
}

void status_lost(struct status *s, const char *reason)
{
    if (s)
        status_state(s, ST_LOST, reason);
}

void status_retry(struct status *s, double seconds, int attempt)
{
    if (!s)
        return;
    double at = status_now() + seconds;
    s->retry_at.tv_sec = (time_t)at;
    s->retry_at.tv_nsec = (long)((at - (double)(time_t)at) * 1e9);
    s->attempt = attempt;
    /* Keeps the reason of the loss on the line. */
    char reason[sizeof(s->detail)];
    snprintf(reason, sizeof(reason), "%s", s->state == ST_LOST ? s->detail : "");
    status_state(s, ST_RECONNECTING, reason);
}

void status_refused(struct status *s, const char *message)
{
    if (s)
        status_state(s, ST_REFUSED, message);
}

void status_set_rtt(struct status *s, double rtt_ms)
{
    if (s)
        s->rtt_ms = rtt_ms;
}

void status_set_client(struct status *s, const char *source, long long takeovers,
                       long long refused)
{
    if (!s)
        return;
    if (!source || (strcmp(source, "config") != 0 && strcmp(source, "api") != 0)) {
        s->client_info[0] = '\0';
        return;
    }
    snprintf(s->client_info, sizeof(s->client_info), "source %s, takeovers %lld, refused %lld",
             source, takeovers, refused);
}

/* ---- targets ---- */

static struct status_target *status_target_new(struct status *s, const char *name)
{
    struct status_target *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    status_printable(name, t->name, sizeof(t->name));
    TAILQ_INSERT_TAIL(&s->targets, t, link);
    s->ntargets++;
    return t;
}

struct status_target *status_target_get(struct status *s, const char *target)
{
    if (!s)
        return NULL;
    char shown[STATUS_TARGET_MAX + 1];
    status_printable(target, shown, sizeof(shown));
    struct status_target *t;
    TAILQ_FOREACH(t, &s->targets, link) {
        if (t != s->other && strcmp(t->name, shown) == 0)
            return t;
    }
    TAILQ_FOREACH(t, &s->hidden, link) {
        if (strcmp(t->name, shown) == 0) {
            TAILQ_REMOVE(&s->hidden, t, link);
            s->nhidden--;
            TAILQ_INSERT_TAIL(&s->targets, t, link);
            s->ntargets++;
            return t;
        }
    }
    if (s->ntargets + s->nhidden < STATUS_TARGETS_MAX)
        return status_target_new(s, shown);
    if (!s->other)
        s->other = status_target_new(s, "(other targets)");
    return s->other;
}

void status_mappings_clear(struct status *s)
{
    if (!s)
        return;
    struct status_target *t, *next;
    for (t = TAILQ_FIRST(&s->targets); t; t = next) {
        next = TAILQ_NEXT(t, link);
        t->nports = 0;
        /* A target only an old announcement knew (never dialled) is no longer drawn. It is
         * hidden, not freed: a dial in flight on another session (a cluster node's) may
         * hold the pointer and count into it when it ends. */
        if (t->total == 0 && t->failed == 0 && t->active == 0 && t != s->other) {
            TAILQ_REMOVE(&s->targets, t, link);
            s->ntargets--;
            TAILQ_INSERT_TAIL(&s->hidden, t, link);
            s->nhidden++;
        }
    }
}

void status_mappings_reset(struct status *s)
{
    if (!s)
        return;
    struct status_target *t;
    TAILQ_FOREACH(t, &s->targets, link)
        t->nports = 0;
}

void status_mappings_prune(struct status *s)
{
    if (!s)
        return;
    struct status_target *t, *next;
    for (t = TAILQ_FIRST(&s->targets); t; t = next) {
        next = TAILQ_NEXT(t, link);
        if (t->nports > 0 || t->active > 0 || t == s->other)
            continue;
        TAILQ_REMOVE(&s->targets, t, link);
        s->ntargets--;
        TAILQ_INSERT_TAIL(&s->hidden, t, link);
        s->nhidden++;
    }
}

void status_mapping_add(struct status *s, int public_port, const char *target)
{
    struct status_target *t = status_target_get(s, target);
    if (!t || t == s->other)
        return;
    if (t->nports < STATUS_PORTS_MAX)
        t->ports[t->nports] = public_port;
    t->nports++;
}

void status_target_opened(struct status_target *t)
{
    if (!t)
        return;
    t->active++;
    t->total++;
}

void status_target_bytes(struct status_target *t, size_t in, size_t out)
{
    if (!t)
        return;
    t->bytes_in += in;
    t->bytes_out += out;
}

void status_target_closed(struct status_target *t)
{
    if (t && t->active > 0)
        t->active--;
}

void status_target_failed(struct status_target *t, const char *why)
{
    if (!t)
        return;
    t->failed++;
    status_printable(why, t->last_error, sizeof(t->last_error));
}

/* ---- cluster nodes ---- */

struct status_node *status_node_add(struct status *s, const char *addr)
{
    if (!s || s->nnodes >= STATUS_NODES_MAX)
        return NULL;
    struct status_node *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->s = s;
    status_printable(addr, n->addr, sizeof(n->addr));
    n->state = ST_CONNECTING;
    clock_gettime(CLOCK_MONOTONIC, &n->since);
    TAILQ_INSERT_TAIL(&s->nodes, n, link);
    s->nnodes++;
    status_draw(s);
    return n;
}

void status_node_remove(struct status *s, struct status_node *n)
{
    if (!s || !n)
        return;
    TAILQ_REMOVE(&s->nodes, n, link);
    s->nnodes--;
    free(n);
    status_draw(s);
}

static void status_node_state(struct status_node *n, enum status_state st, const char *detail)
{
    n->state = st;
    snprintf(n->detail, sizeof(n->detail), "%s", detail ? detail : "");
    clock_gettime(CLOCK_MONOTONIC, &n->since);
    status_draw(n->s);
}

void status_node_connecting(struct status_node *n)
{
    if (n)
        status_node_state(n, ST_CONNECTING, NULL);
}

void status_node_connected(struct status_node *n)
{
    if (!n)
        return;
    n->rtt_ms = 0;
    status_node_state(n, ST_CONNECTED, NULL);
}

void status_node_lost(struct status_node *n, const char *reason)
{
    if (n)
        status_node_state(n, ST_LOST, reason);
}

void status_node_retry(struct status_node *n, double seconds, int attempt)
{
    if (!n)
        return;
    double at = status_now() + seconds;
    n->retry_at.tv_sec = (time_t)at;
    n->retry_at.tv_nsec = (long)((at - (double)(time_t)at) * 1e9);
    n->attempt = attempt;
    char reason[sizeof(n->detail)];
    snprintf(reason, sizeof(reason), "%s", n->state == ST_LOST ? n->detail : "");
    status_node_state(n, ST_RECONNECTING, reason);
}

void status_node_set_rtt(struct status_node *n, double rtt_ms)
{
    if (n)
        n->rtt_ms = rtt_ms;
}

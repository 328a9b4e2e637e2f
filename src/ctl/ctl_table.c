/* portmux-ctl: plain-text tables for people (the --json output is for scripts). */
#include "ctl_table.h"

#include <stdlib.h>
#include <string.h>

struct ctl_table {
    size_t ncols;
    size_t nrows;        /* header included */
    size_t cap;
    char **cells;        /* nrows * ncols */
};

char *ctl_clean(char *s)
{
    for (unsigned char *p = (unsigned char *)s; *p; p++) {
        if (*p < 0x20 || *p == 0x7f) {
            *p = '?';
        } else if (*p == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f) {
            /* U+0080..U+009F, the C1 controls (CSI, OSC...) in UTF-8; jansson's strings
             * are valid UTF-8, so no such byte stands alone */
            p[0] = p[1] = '?';
            p++;
        }
    }
    return s;
}

static char *ctl_clean_dup(const char *s)
{
    char *d = strdup(s ? s : "");
    return d ? ctl_clean(d) : NULL;
}

/* Width on a terminal, counting UTF-8 code points rather than bytes (labels may be
 * UTF-8; wide CJK characters are rare enough in a port table to ignore). */
static size_t ctl_width(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

int ctl_table_add(struct ctl_table *t, const char *const *cells)
{
    if (t->nrows == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        char **p = realloc(t->cells, cap * t->ncols * sizeof(*p));
        if (!p)
            return -1;
        t->cells = p;
        t->cap = cap;
    }
    char **row = t->cells + t->nrows * t->ncols;
    for (size_t i = 0; i < t->ncols; i++) {
        row[i] = ctl_clean_dup(cells[i]);
        if (!row[i]) {
            while (i-- > 0)
                free(row[i]);
            return -1;
        }
    }
    t->nrows++;
    return 0;
}

struct ctl_table *ctl_table_new(const char *const *headers, size_t ncols)
{
    struct ctl_table *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->ncols = ncols;
    if (ctl_table_add(t, headers) != 0) {
        ctl_table_free(t);
        return NULL;
    }
    return t;
}

void ctl_table_print(const struct ctl_table *t, FILE *f)
{
    size_t *w = calloc(t->ncols, sizeof(*w));
    if (!w)
        return;
    for (size_t r = 0; r < t->nrows; r++) {
        for (size_t c = 0; c < t->ncols; c++) {
            size_t n = ctl_width(t->cells[r * t->ncols + c]);
            if (n > w[c])
                w[c] = n;
        }
    }
    for (size_t r = 0; r < t->nrows; r++) {
        for (size_t c = 0; c < t->ncols; c++) {
            const char *cell = t->cells[r * t->ncols + c];
            if (c + 1 == t->ncols) {
                fprintf(f, "%s\n", cell); /* no trailing blanks */
                break;
            }
            fprintf(f, "%s%*s  ", cell, (int)(w[c] - ctl_width(cell)), "");
        }
    }
    free(w);
}

void ctl_table_free(struct ctl_table *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->nrows * t->ncols; i++)
        free(t->cells[i]);
    free(t->cells);
    free(t);
}

void ctl_cell(const json_t *v, char *buf, size_t len)
{
    if (json_is_string(v))
        snprintf(buf, len, "%s", json_string_value(v));
    else if (json_is_integer(v))
        snprintf(buf, len, "%lld", (long long)json_integer_value(v));
    else if (json_is_real(v))
        snprintf(buf, len, "%.3f", json_real_value(v));
    else if (json_is_boolean(v))
        snprintf(buf, len, "%s", json_is_true(v) ? "yes" : "no");
    else
        snprintf(buf, len, "-");
    ctl_clean(buf);
}

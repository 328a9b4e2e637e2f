/* portmux-ctl: plain-text tables for people (the --json output is for scripts). */
#ifndef PORTMUX_CTL_TABLE_H
#define PORTMUX_CTL_TABLE_H

#include <stddef.h>
#include <stdio.h>

#include <jansson.h>

struct ctl_table;

/* A table with ncols columns named by headers (copied). NULL when out of memory. */
struct ctl_table *ctl_table_new(const char *const *headers, size_t ncols);

/* Appends one row of ncols cells (copied; control characters shown as '?'). */
int ctl_table_add(struct ctl_table *t, const char *const *cells);

/* Prints the header and every row, columns padded to their widest cell. */
void ctl_table_print(const struct ctl_table *t, FILE *f);

/* NULL-safe. */
void ctl_table_free(struct ctl_table *t);

/* Replaces in s, in place, what a terminal would obey rather than show: C0 controls, DEL
 * and the C1 controls (U+0080..U+009F) become '?'. Every string from the server goes through it before it is printed: the server, or
 * anyone answering in its place, must not retitle, clear or forge the terminal. */
char *ctl_clean(char *s);

/* Formats a JSON value for a cell: strings as they are, integers in decimal, reals with
 * three decimals, booleans as yes/no, null or absent as "-"; cleaned (ctl_clean). */
void ctl_cell(const json_t *v, char *buf, size_t len);

#endif

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

/* Formats a JSON value for a cell: strings as they are, integers in decimal, reals with
 * three decimals, booleans as yes/no, null or absent as "-". */
void ctl_cell(const json_t *v, char *buf, size_t len);

#endif

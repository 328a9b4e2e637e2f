/* The unit tests' one assertion: counts, prints the failing expression with its place,
 * and ends with the "N passed, N failed" line ctest's log readers look for. */
#ifndef PORTMUX_TEST_CHECK_H
#define PORTMUX_TEST_CHECK_H

#include <stdio.h>

static int check_passed, check_failed;

static inline void check_at(int ok, const char *file, int line, const char *expr)
{
    if (ok) {
        check_passed++;
        return;
    }
    check_failed++;
    fprintf(stderr, "FAIL %s:%d: %s\n", file, line, expr);
}

#define CHECK(expr) check_at((expr) ? 1 : 0, __FILE__, __LINE__, #expr)

/* Prints the summary; returns main's exit status. */
static inline int check_summary(void)
{
    printf("%d passed, %d failed\n", check_passed, check_failed);
    return check_failed != 0;
}

#endif

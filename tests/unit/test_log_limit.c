/* log_limit: one line per period, the held-back count handed to the next one written. */
#include "check.h"
#include "log_limit.h"

int main(void)
{
    struct log_limit l = {0};
    unsigned long held = 99;
    CHECK(log_limit_take(&l, 1000, 10, &held) && held == 0);
    held = 99;
    for (int i = 0; i < 5; i++)
        CHECK(!log_limit_take(&l, 1000 + i, 10, &held));
    CHECK(held == 99); /* untouched while held back */
    CHECK(!log_limit_take(&l, 1009, 10, &held));
    CHECK(log_limit_take(&l, 1010, 10, &held) && held == 6);
    CHECK(log_limit_take(&l, 1020, 10, &held) && held == 0);
    /* A clock set back does not silence the kind for the distance it jumped. */
    CHECK(log_limit_take(&l, 500, 10, &held) && held == 0);
    CHECK(!log_limit_take(&l, 505, 10, &held));
    /* Time 0 is a time like any other: the first line is written. */
    struct log_limit z = {0};
    CHECK(log_limit_take(&z, 0, 10, &held) && held == 0);
    CHECK(!log_limit_take(&z, 3, 10, &held));
    /* A burst of 3 per 10 s: three lines, then held back until the window ends; the
     * next window's first line carries the count. */
    struct log_limit b = {0};
    for (int i = 0; i < 3; i++) {
        held = 99;
        CHECK(log_limit_take_burst(&b, 2000 + i, 10, 3, &held) && held == 0);
    }
    CHECK(!log_limit_take_burst(&b, 2005, 10, 3, &held));
    CHECK(!log_limit_take_burst(&b, 2009, 10, 3, &held));
    CHECK(log_limit_take_burst(&b, 2010, 10, 3, &held) && held == 2);
    CHECK(log_limit_take_burst(&b, 2011, 10, 3, &held) && held == 0);
    return check_summary();
}

/* utf8_clean_copy: well-formed text passes whole; every malformed byte becomes '?'; a cap
 * never cuts a sequence. */
#include <string.h>

#include "check.h"
#include "utf8.h"

static int cleans_to(const char *in, size_t cap, const char *want)
{
    char out[64];
    size_t n = utf8_clean_copy(out, cap, in);
    return strcmp(out, want) == 0 && n == strlen(want);
}

int main(void)
{
    CHECK(cleans_to("", 64, ""));
    CHECK(cleans_to("plain ascii", 64, "plain ascii"));
    CHECK(cleans_to("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 64,
                    "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));
    /* A lone continuation byte, a lead byte with no continuation, an invalid lead. */
    CHECK(cleans_to("a\x80" "b", 64, "a?b"));
    CHECK(cleans_to("a\xc3", 64, "a?"));
    CHECK(cleans_to("\xc3(", 64, "?("));
    CHECK(cleans_to("\xff\xfe", 64, "??"));
    /* A backslash followed by a character a parser cut in two. */
    CHECK(cleans_to("\\\xc3", 64, "\\?"));
    /* Overlong forms, surrogates, beyond U+10FFFF. */
    CHECK(cleans_to("\xc0\xaf", 64, "??"));
    CHECK(cleans_to("\xe0\x80\xaf", 64, "???"));
    CHECK(cleans_to("\xed\xa0\x80", 64, "???"));
    CHECK(cleans_to("\xf4\x90\x80\x80", 64, "????"));
    CHECK(cleans_to("\xf0\x8f\xbf\xbf", 64, "????"));
    CHECK(cleans_to("\xef\xbf\xbf", 64, "\xef\xbf\xbf")); /* U+FFFF is well-formed */
    CHECK(cleans_to("\xf4\x8f\xbf\xbf", 64, "\xf4\x8f\xbf\xbf"));
    /* The cap: 4 bytes of room hold "ab" and no half of the euro sign. */
    CHECK(cleans_to("ab\xe2\x82\xac", 5, "ab"));
    CHECK(cleans_to("ab\xe2\x82\xac", 6, "ab\xe2\x82\xac"));
    CHECK(cleans_to("abc", 1, ""));
    CHECK(cleans_to("abc", 3, "ab"));
    return check_summary();
}

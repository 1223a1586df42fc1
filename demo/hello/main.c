/* main.c - wordstat: word counts and checksums of a built-in text.
 * A small multi-file program for the securecc demo; its output is
 * deterministic, so a build compiled remotely must print the same. */
#include <string.h>

#include "util.h"
#include "wordstat.h"

int main(void)
{
    static struct table t;
    uint32_t crc = 0;

    table_init(&t);
    for (size_t i = 0; i < text_line_count; i++) {
        table_add_line(&t, text_lines[i], (unsigned)(i + 1));
        crc = crc32_update(crc, text_lines[i], strlen(text_lines[i]));
    }
    table_sort(&t);
    report(&t, crc);
    return t.used > 0 && MIN(t.total, 1u) == 1 ? 0 : 1;
}

/* report.c - print the table of the most frequent words. */
#include <stdio.h>
#include <string.h>

#include "util.h"
#include "wordstat.h"

void report(const struct table *t, uint32_t text_crc)
{
    size_t rows = MIN((size_t)TOP_N, t->used);
    uint32_t h = 0;
    size_t widest = 0;

    printf("%s: %zu lines, %u words, %zu distinct, crc32 %08x\n",
           TITLE, text_line_count, t->total, t->used, (unsigned)text_crc);
    printf("%-4s %-12s %5s %5s %8s\n", "rank", "word", "count", "line", "hash");
    for (size_t i = 0; i < rows; i++) {
        const struct word *w = &t->words[i];
        uint32_t wh = crc32_update(0, w->text, strlen(w->text));
        h = mix32(h, wh ^ w->count); widest = MAX(widest, strlen(w->text));
        printf("%-4zu %-12s %5u %5u %08x\n", i + 1, w->text, w->count, w->first_line, (unsigned)wh);
    }
    printf("top-%d digest %08x, longest word %zu letters\n", TOP_N, (unsigned)h, widest);
}

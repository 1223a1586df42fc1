/* sort.c - order the table: most frequent first, then alphabetically. */
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "wordstat.h"

static int by_count(const void *a, const void *b)
{
    const struct word *x = a, *y = b;
    if (x->count != y->count)
        return x->count < y->count ? 1 : -1;
    return strcmp(x->text, y->text);
}

void table_sort(struct table *t)
{
    qsort(t->words, MIN(t->used, ARRAY_LEN(t->words)), sizeof t->words[0], by_count);
}

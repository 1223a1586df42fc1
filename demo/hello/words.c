/* words.c - split lines into lower-case words and count them. */
#include <string.h>

#include "util.h"
#include "wordstat.h"

void table_init(struct table *t)
{
    memset(t, 0, sizeof *t);
}

static struct word *lookup(struct table *t, const char *w)
{
    for (size_t i = 0; i < t->used; i++)
        if (strcmp(t->words[i].text, w) == 0)
            return &t->words[i];
    if (t->used == ARRAY_LEN(t->words))
        return NULL;
    return &t->words[t->used++];
}

void table_add_line(struct table *t, const char *line, unsigned line_no)
{
    char w[MAX_WORD];
    size_t n = 0;

    for (const char *p = line;; p++) {
        if (*p && IS_ALPHA(*p)) {
            if (n < sizeof w - 1) w[n++] = TO_LOWER(*p);
            continue;
        }
        if (n > 0) {
            w[n] = '\0';
            struct word *e = lookup(t, w);
            if (e && e->count++ == 0) { memcpy(e->text, w, n + 1); e->first_line = line_no; }
            t->total++;
            n = 0;
        }
        if (!*p)
            break;
    }
}

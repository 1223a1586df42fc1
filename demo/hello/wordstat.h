/* wordstat.h - the program's data types and the functions each file provides. */
#ifndef WORDSTAT_H
#define WORDSTAT_H

#include <stddef.h>
#include <stdint.h>

#ifndef TOP_N /* normally given on the command line by the Makefile */
#define TOP_N 5
#endif

#define MAX_WORD 32
#define MAX_WORDS 512

struct word {
    char text[MAX_WORD];
    unsigned count;
    unsigned first_line; /* 1-based line of the first occurrence */
};

struct table {
    struct word words[MAX_WORDS];
    size_t used;
    unsigned total;
};

/* text.c */
extern const char *const text_lines[];
extern const size_t text_line_count;

/* words.c */
void table_init(struct table *t);
void table_add_line(struct table *t, const char *line, unsigned line_no);

/* sort.c */
void table_sort(struct table *t);

/* crc32.c */
uint32_t crc32_update(uint32_t crc, const void *data, size_t len);
uint32_t mix32(uint32_t h, uint32_t v);

/* report.c */
void report(const struct table *t, uint32_t text_crc);

#endif

/* text.c - the built-in text the program analyses. */
#include "wordstat.h"

const char *const text_lines[] = {
    "The quick brown fox jumps over the lazy dog.",
    "The dog sleeps; the fox does not sleep.",
    "A compile server that proves who it is to the client,",
    "and a client that proves who it is to the server:",
    "that is what Kerberos gives the build, and the build gives back",
    "the same object file it would have made at home.",
    "The fox, the dog and the build all agree on the checksum.",
};

const size_t text_line_count = sizeof text_lines / sizeof text_lines[0];

/* util.h - small macros shared by every file (used mid-line on purpose:
 * the debug line table records their columns, so a remote compile must
 * see the same unexpanded source as a local one). */
#ifndef UTIL_H
#define UTIL_H

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define IS_ALPHA(c) (((c) >= 'a' && (c) <= 'z') || ((c) >= 'A' && (c) <= 'Z') || (c) == '\'')
#define TO_LOWER(c) (((c) >= 'A' && (c) <= 'Z') ? (char)((c) - 'A' + 'a') : (char)(c))
#define ROTL32(x, n) ((uint32_t)(((x) << (n)) | ((x) >> (32 - (n)))))

#endif

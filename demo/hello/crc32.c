/* crc32.c - CRC-32 (IEEE 802.3, reflected) and a small hash mixer. */
#include "util.h"
#include "wordstat.h"

static uint32_t table[256];
static int ready;

static void init(void)
{
    for (uint32_t i = 0; i < ARRAY_LEN(table); i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        table[i] = c;
    }
    ready = 1;
}

uint32_t crc32_update(uint32_t crc, const void *data, size_t len)
{
    const unsigned char *p = data;
    if (!ready) init();
    crc = ~crc;
    while (len--)
        crc = table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

uint32_t mix32(uint32_t h, uint32_t v)
{
    h ^= v * 0x9E3779B1u;
    return ROTL32(h, 13) * 5u + 0xE6546B64u;
}

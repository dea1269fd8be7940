/* crc.c -- CRC32C (Castagnoli), with the SSE4.2 crc32 instruction when the CPU has it. */
#include <string.h>
#include "internal.h"

static uint32_t crc_table[8][256];
static int crc_hw = -1;

/* crc_init -- build the slicing table and probe for SSE4.2 once. */
static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#else
    crc_hw = 0;
#endif
}

#if defined(__x86_64__)
/* crc_hw_update -- three interleaved crc32q streams would be faster; one is enough here. */
__attribute__((target("sse4.2")))
static uint32_t crc_hw_update(uint32_t crc, const uint8_t *p, size_t len)
{
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

/* crc_sw_update -- slicing-by-8 fallback. */
static uint32_t crc_sw_update(uint32_t c, const uint8_t *p, size_t len)
{
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c;
        c = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^ crc_table[5][(w >> 16) & 0xff] ^
            crc_table[4][(w >> 24) & 0xff] ^ crc_table[3][(w >> 32) & 0xff] ^
            crc_table[2][(w >> 40) & 0xff] ^ crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xff];
    return c;
}

#if defined(__x86_64__)
/* crc_hw3 -- three independent buffers of len bytes on three interleaved crc32q chains. */
__attribute__((target("sse4.2")))
static void crc_hw3(const uint8_t *a, const uint8_t *b, const uint8_t *c, size_t len, uint32_t out[3])
{
    uint64_t x = ~0u, y = ~0u, z = ~0u;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t wa, wb, wc;
        memcpy(&wa, a + i, 8);
        memcpy(&wb, b + i, 8);
        memcpy(&wc, c + i, 8);
        x = __builtin_ia32_crc32di(x, wa);
        y = __builtin_ia32_crc32di(y, wb);
        z = __builtin_ia32_crc32di(z, wc);
    }
    out[0] = ~crc_hw_update((uint32_t)x, a + i, len - i);
    out[1] = ~crc_hw_update((uint32_t)y, b + i, len - i);
    out[2] = ~crc_hw_update((uint32_t)z, c + i, len - i);
}
#endif

/* crc_compute3 -- CRC32C of three equal-length buffers, faster than three calls. */
void crc_compute3(const void *a, const void *b, const void *c, size_t len, uint32_t out[3])
{
    if (crc_hw < 0)
        crc_init();
#if defined(__x86_64__)
    if (crc_hw) {
        crc_hw3(a, b, c, len, out);
        return;
    }
#endif
    out[0] = crc_compute(0, a, len);
    out[1] = crc_compute(0, b, len);
    out[2] = crc_compute(0, c, len);
}

/* crc_compute -- continue CRC32C `crc` (0 to start) over buf. */
uint32_t crc_compute(uint32_t crc, const void *buf, size_t len)
{
    if (crc_hw < 0)
        crc_init();
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (crc_hw)
        return ~crc_hw_update(c, buf, len);
#endif
    return ~crc_sw_update(c, buf, len);
}

#define CRC_POLY 0x82f63b78u   /* CRC32C, reflected */

/* crc_mulmod -- a * b modulo the CRC polynomial, bit-reflected (x^0 is the top bit). */
static uint32_t crc_mulmod(uint32_t a, uint32_t b)
{
    uint32_t prod = 0;
    for (uint32_t bit = 1u << 31; bit; bit >>= 1) {
        if (a & bit)
            prod ^= b;
        b = (b & 1) ? (b >> 1) ^ CRC_POLY : b >> 1;
    }
    return prod;
}

/* crc_xpow -- x^(8 len) modulo the polynomial: what appending len bytes does to a CRC. */
uint32_t crc_xpow(uint64_t len)
{
    uint32_t power = 1u << 23;   /* x^8: one byte */
    uint32_t shift = 1u << 31;   /* x^0 */
    for (; len; len >>= 1) {
        if (len & 1)
            shift = crc_mulmod(shift, power);
        power = crc_mulmod(power, power);
    }
    return shift;
}

/* crc_append -- crc(A||B) from crc(A), crc(B) and crc_xpow(len(B)). */
uint32_t crc_append(uint32_t crc_a, uint32_t crc_b, uint32_t xpow_b)
{
    return crc_mulmod(xpow_b, crc_a) ^ crc_b;
}

/* crc_combine -- the CRC of A||B from crc(A), crc(B) and len(B). */
uint32_t crc_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b)
{
    return crc_append(crc_a, crc_b, crc_xpow(len_b));
}

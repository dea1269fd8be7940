/* crc.c -- CRC32C (Castagnoli): carry-less multiplication (PCLMULQDQ) folding for long
 * buffers, the SSE4.2 crc32 instruction for short ones, slicing-by-8 without either. */
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "internal.h"

#define CRC_POLY 0x82f63b78u   /* CRC32C, reflected */

static uint32_t crc_table[8][256];
static int crc_hw = -1;        /* 0 tables, 1 crc32 instruction, 2 and pclmulqdq, 3 and AVX-512 vpclmulqdq */
static uint64_t crc_k[6];      /* fold constants, pairs for 16, 64 and 256 bytes on: x^(8d+63), x^(8d-1) */

static uint32_t crc_xpow_bits(uint64_t n);

/* crc_init -- build the slicing table, probe the CPU and derive the fold constants once. */
static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (CRC_POLY & (0u - (c & 1)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
    /* clmul of two bit-reflected 64-bit operands yields the reflected product times x, so
     * folding a quadword forward by d bits multiplies by x^(d-1) mod P, reflected in 64 bits */
    static const uint64_t bytes[3] = {16, 64, 256};
    for (int i = 0; i < 3; i++) {
        crc_k[2 * i] = (uint64_t)crc_xpow_bits(8 * bytes[i] + 63) << 32;
        crc_k[2 * i + 1] = (uint64_t)crc_xpow_bits(8 * bytes[i] - 1) << 32;
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    int hw = __builtin_cpu_supports("sse4.2");
    hw = hw && __builtin_cpu_supports("pclmul") ? 2 : hw;
    crc_hw = hw == 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq") ? 3 : hw;
#else
    crc_hw = 0;
#endif
}

#if defined(__x86_64__)
/* crc_hw_update -- the crc32 instruction, one stream (short buffers and tails). */
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
/* crc_fold -- acc times x^(distance) mod P, as two carry-less products (k's low lane for
 * acc's low quadword, which holds the first 8 of its message bytes). */
__attribute__((target("sse4.2,pclmul")))
static inline __m128i crc_fold(__m128i acc, __m128i k)
{
    return _mm_xor_si128(_mm_clmulepi64_si128(acc, k, 0x00), _mm_clmulepi64_si128(acc, k, 0x11));
}

/* crc_finish -- fold the last whole 16-byte blocks from byte i into acc (copying them when
 * dst is not NULL), then the crc32 instruction over acc (congruent modulo P) and the tail. */
__attribute__((target("sse4.2,pclmul")))
static uint32_t crc_finish(uint8_t *dst, const uint8_t *src, size_t i, size_t len, __m128i acc, __m128i k16)
{
    for (; i + 16 <= len; i += 16) {
        __m128i y = _mm_loadu_si128((const __m128i *)(src + i));
        if (dst)
            _mm_storeu_si128((__m128i *)(dst + i), y);
        acc = _mm_xor_si128(crc_fold(acc, k16), y);
    }
    if (dst)
        memcpy(dst + i, src + i, len - i);
    uint64_t c = __builtin_ia32_crc32di(0, (uint64_t)_mm_cvtsi128_si64(acc));
    c = __builtin_ia32_crc32di(c, (uint64_t)_mm_extract_epi64(acc, 1));
    return crc_hw_update((uint32_t)c, src + i, len - i);
}

/* crc_clmul -- the CRC register after len >= 64 bytes of src (copied to dst on the way when
 * dst is not NULL): four 128-bit accumulators folded forward 64 bytes at a time, joined,
 * then the crc32 instruction over the last accumulator (congruent modulo P) and the tail. */
__attribute__((target("sse4.2,pclmul")))
static uint32_t crc_clmul(uint8_t *dst, const uint8_t *src, size_t len, uint32_t reg)
{
    const __m128i k16 = _mm_set_epi64x((long long)crc_k[1], (long long)crc_k[0]);
    const __m128i k64 = _mm_set_epi64x((long long)crc_k[3], (long long)crc_k[2]);
    int stream = dst && !((uintptr_t)dst & 63);   /* whole lines only: a partial streamed line is slow */
    __m128i x[4];
    for (int j = 0; j < 4; j++)
        x[j] = _mm_loadu_si128((const __m128i *)(src + 16 * j));
    if (dst)
        memcpy(dst, src, 64);
    x[0] = _mm_xor_si128(x[0], _mm_cvtsi32_si128((int)reg));
    size_t i = 64;
    for (; i + 64 <= len; i += 64)
        for (int j = 0; j < 4; j++) {
            __m128i y = _mm_loadu_si128((const __m128i *)(src + i + 16 * j));
            if (stream)
                _mm_stream_si128((__m128i *)(dst + i + 16 * j), y);
            else if (dst)
                _mm_storeu_si128((__m128i *)(dst + i + 16 * j), y);
            x[j] = _mm_xor_si128(crc_fold(x[j], k64), y);
        }
    __m128i acc = x[0];
    for (int j = 1; j < 4; j++)
        acc = _mm_xor_si128(crc_fold(acc, k16), x[j]);
    return crc_finish(dst, src, i, len, acc, k16);
}
/* crc_clmul512 -- crc_clmul for len >= 256 with 512-bit registers: four accumulators of four
 * 16-byte lanes folded 256 bytes at a time, then joined into one 128-bit accumulator. */
__attribute__((target("sse4.2,pclmul,avx512f,vpclmulqdq")))
static uint32_t crc_clmul512(uint8_t *dst, const uint8_t *src, size_t len, uint32_t reg)
{
    const __m512i k256 = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)crc_k[5], (long long)crc_k[4]));
    const __m512i k64 = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)crc_k[3], (long long)crc_k[2]));
    const __m128i k16 = _mm_set_epi64x((long long)crc_k[1], (long long)crc_k[0]);
    int stream = dst && !((uintptr_t)dst & 63);
    __m512i x[4];
    for (int j = 0; j < 4; j++) {
        x[j] = _mm512_loadu_si512((const void *)(src + 64 * j));
        if (stream)
            _mm512_stream_si512((void *)(dst + 64 * j), x[j]);
        else if (dst)
            _mm512_storeu_si512((void *)(dst + 64 * j), x[j]);
    }
    x[0] = _mm512_xor_si512(x[0], _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)reg)));
    size_t i = 256;
    for (; i + 256 <= len; i += 256)
        for (int j = 0; j < 4; j++) {
            __m512i y = _mm512_loadu_si512((const void *)(src + i + 64 * j));
            if (stream)
                _mm512_stream_si512((void *)(dst + i + 64 * j), y);
            else if (dst)
                _mm512_storeu_si512((void *)(dst + i + 64 * j), y);
            x[j] = _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x[j], k256, 0x00),
                                             _mm512_clmulepi64_epi128(x[j], k256, 0x11), y, 0x96);
        }
    __m512i z = x[0];
    for (int j = 1; j < 4; j++)
        z = _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(z, k64, 0x00),
                                      _mm512_clmulepi64_epi128(z, k64, 0x11), x[j], 0x96);
    __m128i acc = _mm512_extracti32x4_epi32(z, 0);
    acc = _mm_xor_si128(crc_fold(acc, k16), _mm512_extracti32x4_epi32(z, 1));
    acc = _mm_xor_si128(crc_fold(acc, k16), _mm512_extracti32x4_epi32(z, 2));
    acc = _mm_xor_si128(crc_fold(acc, k16), _mm512_extracti32x4_epi32(z, 3));
    return crc_finish(dst, src, i, len, acc, k16);
}
#endif

/* crc_fence -- order the streaming stores of crc_copy before the stores that follow. */
void crc_fence(void)
{
#if defined(__x86_64__)
    __builtin_ia32_sfence();
#endif
}

#if defined(__x86_64__)
/* crc_hw_copy -- copy and checksum 16 bytes at a time with the crc32 instruction; whole
 * 64-byte lines of a line-aligned dst are streamed (a 64-byte object is one line, never read). */
__attribute__((target("sse4.2")))
static uint32_t crc_hw_copy(uint8_t *dst, const uint8_t *src, size_t len, uint32_t reg)
{
    uint64_t c = reg;
    size_t i = 0, lines = (uintptr_t)dst & 63 ? 0 : len / 64 * 64;
    for (; i + 16 <= len; i += 16) {
        __m128i y = _mm_loadu_si128((const __m128i *)(src + i));
        if (i < lines)
            _mm_stream_si128((__m128i *)(dst + i), y);
        else
            _mm_storeu_si128((__m128i *)(dst + i), y);
        c = __builtin_ia32_crc32di(c, (uint64_t)_mm_cvtsi128_si64(y));
        c = __builtin_ia32_crc32di(c, (uint64_t)_mm_extract_epi64(y, 1));
    }
    memcpy(dst + i, src + i, len - i);
    return crc_hw_update((uint32_t)c, src + i, len - i);
}
#endif

/* crc_update -- the register after buf, by the fastest means this CPU has. */
static uint32_t crc_update(uint32_t reg, const void *buf, size_t len)
{
    if (crc_hw < 0)
        crc_init();
#if defined(__x86_64__)
    if (crc_hw == 3 && len >= 256)
        return crc_clmul512(NULL, buf, len, reg);
    if (crc_hw >= 2 && len >= 128)
        return crc_clmul(NULL, buf, len, reg);
    if (crc_hw)
        return crc_hw_update(reg, buf, len);
#endif
    return crc_sw_update(reg, buf, len);
}

/* crc_compute -- continue CRC32C `crc` (0 to start) over buf. */
uint32_t crc_compute(uint32_t crc, const void *buf, size_t len)
{
    return ~crc_update(~crc, buf, len);
}

/* crc_copy -- copy len bytes to dst and return their CRC32C, reading src once.  Whole lines
 * of a line-aligned dst are written with streaming stores, as a large memcpy's are (dst's
 * old lines are not read): they are ordered before later stores only by crc_fence. */
uint32_t crc_copy(void *dst, const void *src, size_t len)
{
    if (crc_hw < 0)
        crc_init();
#if defined(__x86_64__)
    if (crc_hw == 3 && len >= 256)
        return ~crc_clmul512(dst, src, len, ~0u);
    if (crc_hw >= 2 && len >= 128)
        return ~crc_clmul(dst, src, len, ~0u);
    if (crc_hw && len >= 16)
        return ~crc_hw_copy(dst, src, len, ~0u);
#endif
    memcpy(dst, src, len);
    return crc_compute(0, dst, len);
}

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

/* crc_xpow_bits -- x^n modulo the polynomial, reflected. */
static uint32_t crc_xpow_bits(uint64_t n)
{
    uint32_t power = 1u << 30;   /* x^1 */
    uint32_t shift = 1u << 31;   /* x^0 */
    for (; n; n >>= 1) {
        if (n & 1)
            shift = crc_mulmod(shift, power);
        power = crc_mulmod(power, power);
    }
    return shift;
}

/* crc_xpow -- x^(8 len) modulo the polynomial: what appending len bytes does to a CRC. */
uint32_t crc_xpow(uint64_t len)
{
    return crc_xpow_bits(8 * len);
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

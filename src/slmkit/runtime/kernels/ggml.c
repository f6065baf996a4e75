/* slmkit: matmuls that read llama.cpp's GGUF weight blocks as the file stores them (AVX512-VNNI; AVX2, NEON
 * and plain C through the generic path of common.h / simd.h, offset and centre terms alike).
 *
 * Formats (ggml-common.h in llama.cpp, Gerganov et al.; values as gguf-py's quants.py dequantises them):
 *
 *   Q4_0  32 weights in 18 bytes: fp16 d, 16 bytes of nibbles        w = (q - 8) d
 *   Q4_1  32 in 20: fp16 d, fp16 m, 16 bytes of nibbles              w = q d + m
 *   Q5_0  32 in 22: fp16 d, 32 high bits, 16 bytes of nibbles        w = (q - 16) d
 *   Q5_1  32 in 24: fp16 d, fp16 m, 32 high bits, nibbles            w = q d + m
 *   Q8_0  32 in 34: fp16 d, 32 int8                                  w = q d
 *   Q4_K  256 in 144: fp16 d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, nibbles
 *                                                                    w = d sc_j q - dmin m_j
 *   Q5_K  256 in 176: as Q4_K plus 32 bytes of high bits             w = d sc_j q - dmin m_j
 *   Q6_K  256 in 210: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (sub-blocks
 *         of 16), fp16 d                                             w = d sc_j (q - 32)
 *
 * In a block of 32 the low nibbles hold inputs 0..15 and the high nibbles 16..31; in a K-quant
 * super-block each 64 inputs share 32 bytes, low nibbles first (the Q6_K high bits and the Q5_K
 * high bit planes follow the same 64-input chunks). The dot products follow ggml's
 * ggml_vec_dot_{q4_0,q4_1,q5_0,q5_1,q8_0}_q8_{0,1} and ggml_vec_dot_{q4,q5,q6}_K_q8_K
 * (ggml-cpu/arch/x86/quants.c): unsigned codes times int8 activations with vpdpbusd, the code
 * offset removed with the activations' code sums. Differences from ggml, all in the activations'
 * favour: they are quantised per 32 inputs for every format (Q8_0-style, not Q8_K's per 256),
 * and every weight w = (q - o) s + c is written with a centre c (c = m + o d for Q4_1/Q5_1,
 * o d sc_j - dmin m_j for Q4_K/Q5_K, 0 for the symmetric formats) whose product with the
 * activations uses their exact fp32 sums, so the int8 rounding error scales with (w - c), as
 * in slmkit's q4 kernel. For a row, with groups g of 32 inputs (16 for Q6_K):
 *
 *     y = sum_g s_g xs_g dot(q_g, xq_g)  -  o sum_g s_g xs_g sum(xq_g)  +  sum_g c_g sum(x_g)
 *
 * The last two sums and the products s_g xs_g are computed first, 16 groups per vector; then each
 * 64-input chunk costs one vpdpbusd and one fma per token (K % 64 == 0; K % 256 for the K-quants).
 */
#include "common.h"

enum { GG_Q4_0 = 2, GG_Q4_1 = 3, GG_Q5_0 = 6, GG_Q5_1 = 7, GG_Q8_0 = 8, GG_Q4_K = 12, GG_Q5_K = 13, GG_Q6_K = 14 };

static inline int gg_block(int type) {
    switch (type) {
    case GG_Q4_0: case GG_Q4_1: case GG_Q5_0: case GG_Q5_1: case GG_Q8_0: return 32;
    case GG_Q4_K: case GG_Q5_K: case GG_Q6_K: return 256;
    default: return 0;
    }
}

static inline int gg_block_bytes(int type) {
    switch (type) {
    case GG_Q4_0: return 18;
    case GG_Q4_1: return 20;
    case GG_Q5_0: return 22;
    case GG_Q5_1: return 24;
    case GG_Q8_0: return 34;
    case GG_Q4_K: return 144;
    case GG_Q5_K: return 176;
    case GG_Q6_K: return 210;
    default: return 0;
    }
}

/* Bytes of one row of K weights, or -1 when the type has no kernel or K does not suit it. */
int slmkit_gg_row_bytes(int type, int K) {
    const int blk = gg_block(type);
    if (!blk || K <= 0 || K % 64 || K % blk || K > SLMKIT_MAX_K) return -1;
    return K / blk * gg_block_bytes(type);
}

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return slmkit_h2f(h);
}

/* The 6-bit scales and mins of a Q4_K/Q5_K super-block as 8 + 8 bytes (ggml's utmp/kmask unpacking of
 * get_scale_min_k4, in ggml_vec_dot_q4_K_q8_K): sm[0..7] scales, sm[8..15] mins. */
static inline void scales_mins_k4(const uint8_t *q, uint8_t sm[16]) {
    uint32_t u[4];
    memcpy(u, q, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3fu;
    u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3fu;
    memcpy(sm, u, 16);
}

/* log2 of the code offset o of each format: w = (q - o) s + c with q unsigned. */
static inline int gg_shift(int type) {
    switch (type) {
    case GG_Q4_0: case GG_Q4_1: case GG_Q4_K: return 3;
    case GG_Q5_0: case GG_Q5_1: case GG_Q5_K: return 4;
    case GG_Q6_K: return 5;
    default: return 7; /* Q8_0: int8 codes + 128 */
    }
}

static inline int gg_has_centre(int type) {
    return type == GG_Q4_1 || type == GG_Q5_1 || type == GG_Q4_K || type == GG_Q5_K;
}

/* Inputs that share one weight scale: 16 for Q6_K, 32 for every other format. */
static inline int gg_group(int type) { return type == GG_Q6_K ? 16 : 32; }

/* Scale s and additive term a of every group (gg_group inputs) of a row as gguf-py's quants.py computes them,
 * w = (q - o) s + a (see the exact dequantisation below; a = 0 for the symmetric formats). */
static void gg_exact_terms(int type, const uint8_t *row, int K, float *s, float *a) {
    switch (type) {
    case GG_Q4_0: case GG_Q4_1: case GG_Q5_0: case GG_Q5_1: case GG_Q8_0: {
        const int bs = gg_block_bytes(type);
        for (int b = 0; b < K / 32; b++) {
            s[b] = h2f(row + (size_t)b * bs);
            a[b] = gg_has_centre(type) ? h2f(row + (size_t)b * bs + 2) : 0.0f;
        }
        return;
    }
    case GG_Q4_K: case GG_Q5_K: {
        const int bs = gg_block_bytes(type);
        for (int i = 0; i < K / 256; i++) {
            const uint8_t *sb = row + (size_t)i * bs;
            uint8_t sm[16];
            scales_mins_k4(sb + 4, sm);
            const float d = h2f(sb), dmin = h2f(sb + 2);
            for (int j = 0; j < 8; j++) {
                s[8 * i + j] = d * (float)sm[j];
                a[8 * i + j] = -(dmin * (float)sm[8 + j]);
            }
        }
        return;
    }
    default: /* GG_Q6_K */
        for (int i = 0; i < K / 256; i++) {
            const uint8_t *sb = row + (size_t)i * 210;
            const float d = h2f(sb + 208);
            for (int j = 0; j < 16; j++) {
                s[16 * i + j] = d * (float)(int8_t)sb[192 + j];
                a[16 * i + j] = 0.0f;
            }
        }
        return;
    }
}

#if defined(SLMKIT_AVX512)
/* The weight scale s and centre c of every group of a row (K / gg_group inputs each), w = (q - o) s + c. */
static inline __attribute__((always_inline)) void gg_scales(const int type, const uint8_t *row, int K, float *s, float *cen) {
    switch (type) {
    case GG_Q4_0: case GG_Q4_1: case GG_Q5_0: case GG_Q5_1: case GG_Q8_0: {
        const int bs = gg_block_bytes(type), nb = K / 32;
        if (gg_has_centre(type)) { /* Q4_1 / Q5_1 blocks open with fp16 d and m: one 32-bit gather per 16 blocks reads
                                    * both (two scalar copies per block, then vector loads of them stalled on store
                                    * forwarding: one token 90.7 vs 71.1 us, 3072 x 576 Q4_1, Zen 4) */
            const __m512 o = _mm512_set1_ps((float)(1 << gg_shift(type)));
            const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(bs));
            for (int b = 0; b < nb; b += 16) {
                const __mmask16 k = nb - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - b)) - 1);
                const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, at, row + (size_t)b * bs, 1);
                const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
                _mm512_mask_storeu_ps(s + b, k, d); /* w = q d + m = (q - o) d + (m + o d) */
                _mm512_mask_storeu_ps(cen + b, k, _mm512_fmadd_ps(o, d, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)))));
            }
            return;
        }
        uint16_t hd[SLMKIT_MAX_K / 32]; /* nb <= SLMKIT_MAX_K / 32; a copy per block beat a gather for Q4_0 */
        for (int b = 0; b < nb; b++) memcpy(hd + b, row + (size_t)b * bs, 2);
        for (int b = 0; b < nb; b += 16) {
            const __mmask16 k = nb - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - b)) - 1);
            _mm512_mask_storeu_ps(s + b, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, hd + b)));
        }
        return;
    }
    case GG_Q4_K: case GG_Q5_K: {
        const int bs = gg_block_bytes(type);
        const __m256 o = _mm256_set1_ps((float)(1 << gg_shift(type)));
        for (int i = 0; i < K / 256; i++) {
            const uint8_t *sb = row + (size_t)i * bs;
            uint8_t sm[16];
            scales_mins_k4(sb + 4, sm);
            uint64_t s8, m8;
            memcpy(&s8, sm, 8);
            memcpy(&m8, sm + 8, 8);
            const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)s8)));
            const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)m8)));
            const __m256 ds = _mm256_mul_ps(_mm256_set1_ps(h2f(sb)), sc); /* d sc_j, as ggml's d1 = d * sc */
            _mm256_storeu_ps(s + 8 * i, ds);
            /* w = d sc q - dmin m = (q - o) d sc + (o d sc - dmin m) */
            _mm256_storeu_ps(cen + 8 * i, _mm256_fnmadd_ps(_mm256_set1_ps(h2f(sb + 2)), mn, _mm256_mul_ps(o, ds)));
        }
        return;
    }
    default: { /* GG_Q6_K: 16 int8 scales per super-block */
        for (int i = 0; i < K / 256; i++) {
            const uint8_t *sb = row + (size_t)i * 210;
            const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sb + 192))));
            _mm512_storeu_ps(s + 16 * i, _mm512_mul_ps(_mm512_set1_ps(h2f(sb + 208)), sc));
        }
        return;
    }
    }
}

/* Chunk c (inputs 64c .. 64c+63) of a row: the 64 unsigned codes in input order. */
static inline __attribute__((always_inline)) __m512i gg_codes(const int type, const uint8_t *row, int c) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    switch (type) {
    case GG_Q4_0: case GG_Q4_1: case GG_Q5_0: case GG_Q5_1: {
        const int bs = gg_block_bytes(type);
        const int qs = type == GG_Q4_0 ? 2 : type == GG_Q4_1 ? 4 : type == GG_Q5_0 ? 6 : 8;
        const uint8_t *b0 = row + (size_t)(2 * c) * bs, *b1 = b0 + bs;
        __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b0 + qs))),
                                              _mm_loadu_si128((const __m128i *)(b1 + qs)), 1);
        __m512i z = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1), m4);
        z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0)); /* [b0 low, b0 high, b1 low, b1 high]: input order */
        if (type == GG_Q5_0 || type == GG_Q5_1) { /* bit i of the block's 32 high bits belongs to input i */
            const int qh = type == GG_Q5_0 ? 2 : 4;
            uint32_t h0, h1;
            memcpy(&h0, b0 + qh, 4);
            memcpy(&h1, b1 + qh, 4);
            z = _mm512_or_si512(z, _mm512_maskz_mov_epi8((__mmask64)h0 | ((__mmask64)h1 << 32), _mm512_set1_epi8(0x10)));
        }
        return z;
    }
    case GG_Q8_0: {
        const uint8_t *b0 = row + (size_t)(2 * c) * 34, *b1 = b0 + 34;
        __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),
                                       _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);
        return _mm512_xor_si512(z, _mm512_set1_epi8((char)0x80)); /* int8 q -> q + 128 */
    }
    case GG_Q4_K: case GG_Q5_K: {
        const uint8_t *sb = row + (size_t)(c >> 2) * gg_block_bytes(type);
        const int j = c & 3;
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(sb + (type == GG_Q4_K ? 16 : 48) + 32 * j));
        __m512i z = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1), m4);
        if (type == GG_Q5_K) { /* bit 2j of qh[l] is input l's fifth bit, bit 2j+1 input 32+l's */
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(sb + 16));
            __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(qh, 2 * j)), _mm256_srli_epi16(qh, 2 * j + 1), 1);
            z = _mm512_or_si512(z, _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(1)), 4));
        }
        return z;
    }
    default: { /* GG_Q6_K: chunk j of the super-block is half j/2, low (j even) or high nibbles */
        const uint8_t *sb = row + (size_t)(c >> 2) * 210;
        const int j = c & 3, n = j >> 1, part = j & 1;
        const __m512i ql = _mm512_loadu_si512((const void *)(sb + 64 * n));
        const __m512i lo = part ? _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4) : _mm512_and_si512(ql, m4);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(sb + 128 + 32 * n));
        __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(qh, 4 * part)), _mm256_srli_epi16(qh, 4 * part + 2), 1);
        return _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(3)), 4));
    }
    }
}
#else
/* The offset o of the codes the generic path multiplies: Q8_0's int8 codes are used signed (o = 0). */
static inline float gg_offset(int type) { return type == GG_Q8_0 ? 0.0f : (float)(1 << gg_shift(type)); }

/* The weight scale s and centre c of every group of a row (K / gg_group inputs each), w = (q - o) s + c:
 * gguf-py's terms with c = a + o s (o s is exact, so c has the one rounding of the sum). */
static inline __attribute__((always_inline)) void gg_scales(const int type, const uint8_t *row, int K, float *s, float *cen) {
    gg_exact_terms(type, row, K, s, cen);
    if (!gg_has_centre(type)) return;
    const float o = gg_offset(type);
    for (int g = 0; g < K / gg_group(type); g++) cen[g] += o * s[g]; /* Q4_1: m + o d; Q4_K: o d sc - dmin m */
}

/* Chunk c (inputs 64c .. 64c+63) of a row: the 64 codes in input order as two halves of 32 (unsigned,
 * but Q8_0's signed). The same layouts as the AVX-512 gg_codes. */
static inline __attribute__((always_inline)) void gg_codes2(const int type, const uint8_t *row, int c, vb *u0, vb *u1) {
    switch (type) {
    case GG_Q4_0: case GG_Q4_1: case GG_Q5_0: case GG_Q5_1: {
        const int bs = gg_block_bytes(type);
        const int qs = type == GG_Q4_0 ? 2 : type == GG_Q4_1 ? 4 : type == GG_Q5_0 ? 6 : 8;
        const uint8_t *b0 = row + (size_t)(2 * c) * bs, *b1 = b0 + bs;
        *u0 = vb_nib16(b0 + qs);
        *u1 = vb_nib16(b1 + qs);
        if (type == GG_Q5_0 || type == GG_Q5_1) { /* bit i of the block's 32 high bits belongs to input i */
            const int qh = type == GG_Q5_0 ? 2 : 4;
            uint32_t h0, h1;
            memcpy(&h0, b0 + qh, 4);
            memcpy(&h1, b1 + qh, 4);
            *u0 = vb_or(*u0, vb_bits4(h0));
            *u1 = vb_or(*u1, vb_bits4(h1));
        }
        return;
    }
    case GG_Q8_0: {
        const uint8_t *b0 = row + (size_t)(2 * c) * 34;
        *u0 = vb_load(b0 + 2);
        *u1 = vb_load(b0 + 34 + 2);
        return;
    }
    case GG_Q4_K: case GG_Q5_K: {
        const uint8_t *sb = row + (size_t)(c >> 2) * gg_block_bytes(type);
        const int j = c & 3;
        const vb raw = vb_load(sb + (type == GG_Q4_K ? 16 : 48) + 32 * j);
        *u0 = vb_lo4(raw);
        *u1 = vb_hi4(raw);
        if (type == GG_Q5_K) { /* bit 2j of qh[l] is input l's fifth bit, bit 2j+1 input 32+l's */
            const vb qh = vb_load(sb + 16);
            *u0 = vb_or(*u0, vb_field(qh, 2 * j, 1));
            *u1 = vb_or(*u1, vb_field(qh, 2 * j + 1, 1));
        }
        return;
    }
    default: { /* GG_Q6_K: chunk j of the super-block is half j/2, low (j even) or high nibbles */
        const uint8_t *sb = row + (size_t)(c >> 2) * 210;
        const int j = c & 3, n = j >> 1, part = j & 1;
        const vb ql0 = vb_load(sb + 64 * n), ql1 = vb_load(sb + 64 * n + 32), qh = vb_load(sb + 128 + 32 * n);
        *u0 = vb_or(part ? vb_hi4(ql0) : vb_lo4(ql0), vb_field(qh, 4 * part, 3));
        *u1 = vb_or(part ? vb_hi4(ql1) : vb_lo4(ql1), vb_field(qh, 4 * part + 2, 3));
        return;
    }
    }
}
#endif

/* From quantised activations (xq M x K, xs M x K/32): per group of 16 and of 32 inputs the group's
 * scale times its code sum (xc16, xc32: the code offset's correction), and the scale per 16 (xs16). */
void slmkit_gg_prepare(const int8_t *xq, const float *xs, int M, int K, float *xc32, float *xc16, float *xs16) {
    const int nb = K / GROUP;
    for (int t = 0; t < M; t++)
        for (int b = 0; b < nb; b++) {
            const int8_t *q = xq + (size_t)t * K + 32 * b;
            int s0 = 0, s1 = 0;
            for (int i = 0; i < 16; i++) {
                s0 += q[i];
                s1 += q[16 + i];
            }
            const float d = xs[(size_t)t * nb + b];
            xc32[(size_t)t * nb + b] = d * (float)(s0 + s1);
            xc16[(size_t)t * 2 * nb + 2 * b] = d * (float)s0;
            xc16[(size_t)t * 2 * nb + 2 * b + 1] = d * (float)s1;
            xs16[(size_t)t * 2 * nb + 2 * b] = xs16[(size_t)t * 2 * nb + 2 * b + 1] = d;
        }
}

#define comb(t) (comb_ + (size_t)(t) * ng)

#if defined(SLMKIT_AVX512)
/* Rows [r0, r1) of y for T (1..4) tokens. Per row: the groups' scales combined with each token's
 * activation scales (comb) and the offset / centre terms summed first, in 16-wide vectors; then per
 * chunk one vpdpbusd per token and one fma with that chunk's two (or four, Q6_K) combined scales. */
static inline __attribute__((always_inline)) void gg_rows_T(const int type, const int T, const uint8_t *w, int K,
                                                            const slmkit_gg_act *a, int r0, int r1, void *y, int ldy, int y_bf16) {
    const int nc = K / 64, G = gg_group(type), ng = K / G, nb = K / 32, sh = gg_shift(type), cen_ = gg_has_centre(type);
    const size_t rb = (size_t)slmkit_gg_row_bytes(type, K), step = rb / nc;
    const float *xc = G == 16 ? a->xc16 : a->xc32, *xsg = G == 16 ? a->xs16 : a->xs;
    const __m512 o = _mm512_set1_ps((float)(1 << sh));
    /* lanes of a chunk's 64 inputs (4 per lane) -> its groups: 2 of 32 (8 lanes each) or 4 of 16 */
    const __m512i lanes = G == 16 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                                  : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    /* fixed bounds (ng <= SLMKIT_MAX_K / 16): 16 KB each, comb 64 KB, laid out as comb[T][ng] */
    float s[SLMKIT_MAX_K / 16], cen[SLMKIT_MAX_K / 16], comb_[4 * (SLMKIT_MAX_K / 16)];
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w + (size_t)r * rb;
        gg_scales(type, row, K, s, cen);
        __m512 acc[4];
        for (int t = 0; t < T; t++) {
            acc[t] = _mm512_setzero_ps();
            for (int g = 0; g < ng; g += 16) {
                const __mmask16 k = ng - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (ng - g)) - 1);
                const __m512 sv = _mm512_maskz_loadu_ps(k, s + g);
                _mm512_mask_storeu_ps(comb(t) + g, k, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(k, xsg + (size_t)t * ng + g)));
                /* - o s xs sum(xq): the code offset */
                acc[t] = _mm512_fnmadd_ps(_mm512_mul_ps(o, sv), _mm512_maskz_loadu_ps(k, xc + (size_t)t * ng + g), acc[t]);
                if (cen_) /* + c sum(x): the centre, with the exact activation sums (groups of 32) */
                    acc[t] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, cen + g), _mm512_maskz_loadu_ps(k, a->xsum + (size_t)t * nb + g), acc[t]);
            }
        }
        for (int c = 0; c < nc; c++) {
            _mm_prefetch((const char *)row + step * c + PREFETCH_BYTES, _MM_HINT_T0); /* rows stream: fetch ahead */
            const __m512i u = gg_codes(type, row, c);
            for (int t = 0; t < T; t++) {
                const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512((const void *)(a->xq + (size_t)t * K + 64 * c)));
                const __m512 sc = G == 16 ? _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(comb(t) + 4 * c)))
                                          : _mm512_permutexvar_ps(lanes, _mm512_castpd_ps(_mm512_castpd128_pd512(_mm_load_sd((const double *)(comb(t) + 2 * c)))));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[t]);
            }
        }
        for (int t = 0; t < T; t++) {
            const float v = _mm512_reduce_add_ps(acc[t]);
            if (y_bf16) ((uint16_t *)y)[(size_t)t * ldy + r] = f32_to_bf16(v);
            else ((float *)y)[(size_t)t * ldy + r] = v;
        }
    }
}
#else
/* Rows [r0, r1) of y for T (1..4) tokens, the generic path: per row the groups' scales combined with each
 * token's activation scales (comb) and the offset / centre terms summed first; then per 32-input half
 * of each chunk one integer dot product per token and its fma with the half's one (two, Q6_K) scales. */
static inline __attribute__((always_inline)) void gg_rows_T(const int type, const int T, const uint8_t *w, int K,
                                                            const slmkit_gg_act *a, int r0, int r1, void *y, int ldy, int y_bf16) {
    const int nc = K / 64, G = gg_group(type), ng = K / G, nb = K / 32, cen_ = gg_has_centre(type), sgn = type == GG_Q8_0;
    const size_t rb = (size_t)slmkit_gg_row_bytes(type, K), step = rb / nc;
    const float *xc = G == 16 ? a->xc16 : a->xc32, *xsg = G == 16 ? a->xs16 : a->xs, o = gg_offset(type);
    float s[SLMKIT_MAX_K / 16], cen[SLMKIT_MAX_K / 16], comb_[4 * (SLMKIT_MAX_K / 16)];
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w + (size_t)r * rb;
        gg_scales(type, row, K, s, cen);
        vacc acc[4];
        float off[4];
        for (int t = 0; t < T; t++) {
            for (int g = 0; g < ng; g++) comb(t)[g] = s[g] * xsg[(size_t)t * ng + g];
            /* + c sum(x) (the centre, exact activation sums, groups of 32) - o s xs sum(xq) (the code offset) */
            off[t] = dot_sub_f32(cen_ ? cen : NULL, a->xsum + (size_t)t * nb, o, s, xc + (size_t)t * ng, ng);
            acc[t] = vacc_zero();
        }
        for (int c = 0; c < nc; c++) {
            SLMKIT_PREFETCH(row + step * c + PREFETCH_BYTES); /* rows stream: fetch ahead */
            vb u0, u1;
            gg_codes2(type, row, c, &u0, &u1);
            for (int t = 0; t < T; t++) {
                const int8_t *xt = a->xq + (size_t)t * K + 64 * c;
                const float *ct = comb(t) + (64 / G) * c;
                acc[t] = vacc_dot(acc[t], u0, xt, ct, G, sgn);
                acc[t] = vacc_dot(acc[t], u1, xt + 32, ct + 32 / G, G, sgn);
            }
        }
        for (int t = 0; t < T; t++) {
            const float v = vacc_sum(acc[t]) + off[t];
            if (y_bf16) ((uint16_t *)y)[(size_t)t * ldy + r] = f32_to_bf16(v);
            else ((float *)y)[(size_t)t * ldy + r] = v;
        }
    }
}
#endif

#undef comb

#define GG_T(type, T) gg_rows_T(type, T, w, K, &at, ra, rb, o, ldy, y_bf16)
#define GG_TYPE(type)                          \
    case type:                                 \
        switch (T) {                           \
        case 1: GG_T(type, 1); break;          \
        case 2: GG_T(type, 2); break;          \
        case 3: GG_T(type, 3); break;          \
        default: GG_T(type, 4); break;         \
        }                                      \
        break;

/* Rows [ra, rb) of y for every token, 4 tokens per pass (its own function: each inlined format instance holds its
 * own stack arrays, and one frame holding them all must stay under the -Wframe-larger-than bound). */
static __attribute__((noinline)) void gg_rows_tile(int type, const uint8_t *w, int K, const slmkit_gg_act *a, int M,
                                                   int ra, int rb, void *y, int ldy, int y_bf16) {
    const int nb = K / GROUP;
    for (int t0 = 0; t0 < M; t0 += 4) {
        const int T = M - t0 < 4 ? M - t0 : 4;
        const slmkit_gg_act at = {a->xq + (size_t)t0 * K, a->xs + (size_t)t0 * nb, a->xsum + (size_t)t0 * nb,
                                  a->xc32 + (size_t)t0 * nb, a->xc16 + (size_t)t0 * 2 * nb, a->xs16 + (size_t)t0 * 2 * nb};
        void *o = y_bf16 ? (void *)((uint16_t *)y + (size_t)t0 * ldy) : (void *)((float *)y + (size_t)t0 * ldy);
        switch (type) {
            GG_TYPE(GG_Q4_0)
            GG_TYPE(GG_Q4_1)
            GG_TYPE(GG_Q5_0)
            GG_TYPE(GG_Q5_1)
            GG_TYPE(GG_Q8_0)
            GG_TYPE(GG_Q4_K)
            GG_TYPE(GG_Q5_K)
            GG_TYPE(GG_Q6_K)
        default: break;
        }
    }
}

/* Rows [r0, r1) of y (M x N, row stride ldy) = W x for a weight in GGUF format `type`, activations prepared:
 * 8 rows at a time, every token pass over them while they are in cache (callers pass a thread's whole share). */
void slmkit_gg_rows(int type, const uint8_t *w, int K, const slmkit_gg_act *a, int M, int r0, int r1, void *y, int ldy, int y_bf16) {
    for (int ra = r0; ra < r1; ra += 8)
        gg_rows_tile(type, w, K, a, M, ra, ra + 8 < r1 ? ra + 8 : r1, y, ldy, y_bf16);
}

/* y (M x N) = x (M x K) @ W^T with W (N rows of K) in GGUF format `type`. x and y are fp32, or bf16
 * when the flag is set. Returns 0 on success, -2 for a type or shape without a kernel, -1 out of memory. */
int slmkit_gg_matmul(const void *x, int x_bf16, int M, int K, int type, const uint8_t *w, int N, void *y, int y_bf16) {
    if (slmkit_gg_row_bytes(type, K) < 0 || K > SLMKIT_MAX_K || M < 1 || N < 0) return -2;
    const size_t mk = (size_t)M * K, mb = mk / GROUP;
    const size_t need[7] = {mk, 4 * mb, 4 * mb, 4 * mb, 4 * mb, 8 * mb, 8 * mb};
    void *buf[7];
    for (int i = 0; i < 7; i++)
        if (!(buf[i] = slmkit_scratch(SCR_GG + i, need[i]))) return -1;
    int8_t *xq = (int8_t *)buf[0];
    float *xs = (float *)buf[1], *xsum = (float *)buf[2], *xcorr = (float *)buf[3];
    float *xc32 = (float *)buf[4], *xc16 = (float *)buf[5], *xs16 = (float *)buf[6];
    slmkit_q4_quantize(x, x_bf16, M, K, xq, xs, xsum, xcorr);
    slmkit_gg_prepare(xq, xs, M, K, xc32, xc16, xs16);
    const slmkit_gg_act a = {xq, xs, xsum, xc32, xc16, xs16};
    const int tile = 8, ntiles = (N + tile - 1) / tile;
#pragma omp parallel
    { /* contiguous shares of whole tiles, one slmkit_gg_rows call per thread (as decode.c's mm_segs) */
        int lo, hi;
        slmkit_share(ntiles, &lo, &hi);
        if (lo < hi) slmkit_gg_rows(type, w, K, &a, M, lo * tile, hi * tile < N ? hi * tile : N, y, N, y_bf16);
    }
    return 0;
}

/* ------------------------------------------------------------------ dequantisation
 *
 * For long prompts (compute-bound: a bf16 matmul beats the int8 dot products) and embedding lookups.
 * Every 16 inputs of a chunk share one scale and centre (lane 4p of dv/cv for inputs 16p..16p+15).
 */
#if defined(SLMKIT_AVX512)
static inline __attribute__((always_inline)) void gg_dequant_row(const int type, const uint8_t *row, int K, float *of, uint16_t *ob) {
    const int nc = K / 64, G = gg_group(type);
    float s[SLMKIT_MAX_K / 16], cen[SLMKIT_MAX_K / 16]; /* K / G groups <= SLMKIT_MAX_K / 16 */
    gg_scales(type, row, K, s, cen);
    const __m512 o = _mm512_set1_ps((float)(1 << gg_shift(type)));
    for (int c = 0; c < nc; c++) {
        const __m512i u = gg_codes(type, row, c);
        for (int p = 0; p < 4; p++) { /* inputs 64c + 16p .. +15 share group (64c + 16p) / G */
            __m128i part;
            switch (p) {
            case 0: part = _mm512_extracti32x4_epi32(u, 0); break;
            case 1: part = _mm512_extracti32x4_epi32(u, 1); break;
            case 2: part = _mm512_extracti32x4_epi32(u, 2); break;
            default: part = _mm512_extracti32x4_epi32(u, 3); break;
            }
            const int g = (64 * c + 16 * p) / G;
            const __m512 q = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part)), o);
            const __m512 v = gg_has_centre(type) ? _mm512_fmadd_ps(q, _mm512_set1_ps(s[g]), _mm512_set1_ps(cen[g]))
                                                 : _mm512_mul_ps(q, _mm512_set1_ps(s[g]));
            if (of) _mm512_storeu_ps(of + 64 * c + 16 * p, v);
            else store_bf16x16(ob + 64 * c + 16 * p, v);
        }
    }
}
#else
static inline __attribute__((always_inline)) void gg_dequant_row(const int type, const uint8_t *row, int K, float *of, uint16_t *ob) {
    const int nc = K / 64, G = gg_group(type);
    float s[SLMKIT_MAX_K / 16], cen[SLMKIT_MAX_K / 16]; /* K / G groups <= SLMKIT_MAX_K / 16 */
    gg_scales(type, row, K, s, cen);
    const float o = gg_offset(type);
    for (int c = 0; c < nc; c++) {
        vb u[2];
        int8_t codes[64];
        gg_codes2(type, row, c, &u[0], &u[1]);
        memcpy(codes, &u[0], 32);
        memcpy(codes + 32, &u[1], 32);
        for (int i = 0; i < 64; i++) {
            const int g = (64 * c + i) / G;
            const float q = (type == GG_Q8_0 ? (float)codes[i] : (float)(uint8_t)codes[i]) - o;
            const float v = gg_has_centre(type) ? q * s[g] + cen[g] : q * s[g];
            if (of) of[64 * c + i] = v;
            else ob[64 * c + i] = f32_to_bf16(v);
        }
    }
}
#endif

#define GG_DQ(type) case type: gg_dequant_row(type, row, K, of, ob); break;

static void gg_dequant_one(int type, const uint8_t *row, int K, float *of, uint16_t *ob) {
    switch (type) {
        GG_DQ(GG_Q4_0)
        GG_DQ(GG_Q4_1)
        GG_DQ(GG_Q5_0)
        GG_DQ(GG_Q5_1)
        GG_DQ(GG_Q8_0)
        GG_DQ(GG_Q4_K)
        GG_DQ(GG_Q5_K)
        GG_DQ(GG_Q6_K)
    default: break;
    }
}

/* The bf16 weight (N x K) a GGUF tensor stands for. Returns 0, or -2 for a type or shape without a kernel. */
int slmkit_gg_dequant_bf16(int type, const uint8_t *w, int N, int K, uint16_t *out) {
    const int rb = slmkit_gg_row_bytes(type, K);
    if (rb < 0) return -2;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) gg_dequant_one(type, w + (size_t)r * rb, K, NULL, out + (size_t)r * K);
    return 0;
}

/* fp32 rows ids[0..n) of a GGUF tensor with K columns (an embedding lookup), into out (n x K). */
int slmkit_gg_rows_f32(int type, const uint8_t *w, int K, const int64_t *ids, int n, float *out) {
    const int rb = slmkit_gg_row_bytes(type, K);
    if (rb < 0) return -2;
    for (int i = 0; i < n; i++) gg_dequant_one(type, w + (size_t)ids[i] * rb, K, out + (size_t)i * K, NULL);
    return 0;
}

/* ------------------------------------------------------------------ exact fp32 dequantisation
 *
 * The fp32 weights gguf-py's quants.py (dequantize_blocks) computes, bit for bit: what transformers holds
 * after loading a GGUF file. Every weight is w = (q - o) s + a with small integer codes q - o, a scale s
 * that is an fp16 value or an exact product of two (d sc_j, dmin m_j fit fp32's 24 bits), and an additive
 * term a: none for Q4_0/Q5_0/Q8_0/Q6_K, whose products (q - o) s are exact (signed zeros included); m for Q4_1/Q5_1 (gguf-py: d q + m)
 * and -dmin m_j for Q4_K/Q5_K (d sc q - dmin m), whose one rounding is the sum's: q s is exact, so fused or
 * not the result is gguf-py's. For kernels/f32.c's slmkit_gg_f32_matmul_parts (fp32 activations on the file's codes:
 * the dequantised model's numbers at a seventh of its bytes) and exact embedding rows. */

typedef float gg_v16 __attribute__((vector_size(64)));
typedef uint8_t gg_u8x16 __attribute__((vector_size(16)));

/* The code offset o of the unsigned codes gg_exact_row converts (Q8_0's int8 codes taken as q + 128). */
static inline float gg_exact_offset(int type) {
    switch (type) {
    case GG_Q4_0: return 8.0f;
    case GG_Q5_0: return 16.0f;
    case GG_Q8_0: return 128.0f;
    case GG_Q6_K: return 32.0f;
    default: return 0.0f;
    }
}


static inline __attribute__((always_inline)) void gg_exact_row(const int type, const uint8_t *row, int K, float *out) {
    float s[SLMKIT_MAX_K / 16], a[SLMKIT_MAX_K / 16]; /* K / gg_group(type) groups <= SLMKIT_MAX_K / 16 */
    gg_exact_terms(type, row, K, s, a);
    const int G = gg_group(type);
    const float o = gg_exact_offset(type);
#if defined(SLMKIT_AVX512)
    const __m512 ov = _mm512_set1_ps(o);
    for (int c = 0; c < K / 64; c++) {
        const __m512i u = gg_codes(type, row, c);
        for (int p = 0; p < 4; p++) { /* inputs 64c + 16p .. +15 share group (64c + 16p) / G */
            __m128i part;
            switch (p) {
            case 0: part = _mm512_extracti32x4_epi32(u, 0); break;
            case 1: part = _mm512_extracti32x4_epi32(u, 1); break;
            case 2: part = _mm512_extracti32x4_epi32(u, 2); break;
            default: part = _mm512_extracti32x4_epi32(u, 3); break;
            }
            const int g = (64 * c + 16 * p) / G;
            const __m512 q = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part)), ov); /* small integers: exact */
            const __m512 w = gg_has_centre(type) ? _mm512_fmadd_ps(q, _mm512_set1_ps(s[g]), _mm512_set1_ps(a[g]))
                                                 : _mm512_mul_ps(q, _mm512_set1_ps(s[g])); /* no + 0: keeps gguf-py's -0 */
            _mm512_storeu_ps(out + 64 * c + 16 * p, w);
        }
    }
#else
    for (int c = 0; c < K / 64; c++) {
        vb u[2]; /* the 64 codes in input order, two halves (Q8_0's signed) */
        gg_codes2(type, row, c, &u[0], &u[1]);
        for (int p = 0; p < 4; p++) {
            gg_u8x16 b;
            memcpy(&b, (const uint8_t *)&u[p >> 1] + 16 * (p & 1), 16); /* a lane extract, not a store and reload */
            if (type == GG_Q8_0) b ^= (uint8_t)0x80; /* int8 q -> q + 128 */
            const int g = (64 * c + 16 * p) / G;
            const gg_v16 q = __builtin_convertvector(b, gg_v16) - o; /* small integers: exact */
            const gg_v16 w = gg_has_centre(type) ? q * s[g] + a[g] : q * s[g];
            memcpy(out + 64 * c + 16 * p, &w, sizeof w);
        }
    }
#endif
}

#define GG_EX(type) case type: gg_exact_row(type, row, K, out); return 0;

/* One row of K weights of a GGUF tensor in format `type`, dequantised exactly as gguf-py does, into out (K floats).
 * Returns 0, or -2 for a type or shape without a kernel. */
int slmkit_gg_row_exact(int type, const uint8_t *row, int K, float *out) {
    if (slmkit_gg_row_bytes(type, K) < 0) return -2;
    switch (type) {
        GG_EX(GG_Q4_0)
        GG_EX(GG_Q4_1)
        GG_EX(GG_Q5_0)
        GG_EX(GG_Q5_1)
        GG_EX(GG_Q8_0)
        GG_EX(GG_Q4_K)
        GG_EX(GG_Q5_K)
        GG_EX(GG_Q6_K)
    default: return -2;
    }
}

/* Rows ids[0..n) (all N rows in order when ids is NULL) of a GGUF tensor with K columns, exact fp32, into out (n x K). */
int slmkit_gg_rows_exact(int type, const uint8_t *w, int K, const int64_t *ids, int n, float *out) {
    const int rb = slmkit_gg_row_bytes(type, K);
    if (rb < 0 || n < 0) return -2;
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (n > 64)
    for (int i = 0; i < n; i++)
        bad |= slmkit_gg_row_exact(type, w + (size_t)(ids ? ids[i] : i) * rb, K, out + (size_t)i * K) != 0;
    return bad ? -2 : 0;
}

#if defined(SLMKIT_AVX512)
/* ------------------------------------------------------------------ full precision straight from the blocks (AVX-512)
 *
 * slmkit_gg_f32_matmul_parts's tile without the dequantised copy: 16 weights at a time are decoded into a register
 * (the same value slmkit_gg_row_exact writes) and multiplied into the activation rows at once, in the order of
 * kernels/f32.c's f32_tile (lane j sums inputs k = j mod 16 in order with fused multiply-adds, then
 * _mm512_reduce_add_ps), so the products are bit for bit those of the buffered path and of the dense fp32
 * kernel, and a one-token step does not write and re-read every weight. */

/* Weights k .. k+15 of a row in a K-quant format (w = (q - o) s + a as gg_exact_row computes them); s, a: the row's
 * group terms. The 32-input block formats go through gg_w32. */
static inline __attribute__((always_inline)) __m512 gg_w16(const int type, const uint8_t *row, int k, const float *s, const float *a) {
    const __m512i m4 = _mm512_set1_epi32(0x0F);
    __m512i v;
    switch (type) {
    case GG_Q4_K: case GG_Q5_K: {
        const int bs = gg_block_bytes(type), t = k & 255, j = t >> 6, part = (t >> 5) & 1, l = t & 31;
        const uint8_t *sb = row + (size_t)(k >> 8) * bs;
        v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sb + (type == GG_Q4_K ? 16 : 48) + 32 * j + l)));
        v = part ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, m4);
        if (type == GG_Q5_K) { /* bit 2j of qh[l] is input 64j + l's fifth bit, bit 2j + 1 input 64j + 32 + l's */
            const __m512i h = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sb + 16 + l)));
            v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 2 * j + part), _mm512_set1_epi32(1)), 4));
        }
        break;
    }
    default: { /* GG_Q6_K: 64-input chunk c = j of the super-block is half n = j / 2, low (j even) or high nibbles */
        const int t = k & 255, j = t >> 6, n = j >> 1, part = j & 1, u = t & 63;
        const uint8_t *sb = row + (size_t)(k >> 8) * 210;
        __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sb + 64 * n + u)));
        lo = part ? _mm512_srli_epi32(lo, 4) : _mm512_and_si512(lo, m4);
        const __m512i h = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sb + 128 + 32 * n + (u & 31))));
        const int shift = 4 * part + 2 * (u >> 5);
        v = _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, shift), _mm512_set1_epi32(3)), 4));
        break;
    }
    }
    const int g = k / gg_group(type);
    const __m512 q = _mm512_sub_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(gg_exact_offset(type)));
    return gg_has_centre(type) ? _mm512_fmadd_ps(q, _mm512_set1_ps(s[g]), _mm512_set1_ps(a[g])) : _mm512_mul_ps(q, _mm512_set1_ps(s[g]));
}

/* Weights k .. k+31 of a row in a 32-input block format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; k % 32 == 0) as two vectors:
 * the block's bytes are read and its scale and term broadcast once for both halves (the same values as gg_w16). */
static inline __attribute__((always_inline)) void gg_w32(const int type, const uint8_t *row, int k, const float *s, const float *a,
                                                        __m512 *w0, __m512 *w1) {
    const int b = k >> 5;
    const __m512 sv = _mm512_set1_ps(s[b]);
    if (type == GG_Q8_0) {
        const uint8_t *q = row + (size_t)b * 34 + 2;
        *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), sv);
        *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), sv);
        return;
    }
    const int bs = gg_block_bytes(type);
    const int qs = type == GG_Q4_0 ? 2 : type == GG_Q4_1 ? 4 : type == GG_Q5_0 ? 6 : 8;
    const uint8_t *blk = row + (size_t)b * bs;
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + qs)));
    __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F)), hi = _mm512_srli_epi32(v, 4);
    if (type == GG_Q5_0 || type == GG_Q5_1) { /* bit i of the block's 32 high bits is input i's fifth bit */
        uint32_t h;
        memcpy(&h, blk + (type == GG_Q5_0 ? 2 : 4), 4);
        lo = _mm512_mask_or_epi32(lo, (__mmask16)h, lo, _mm512_set1_epi32(16));
        hi = _mm512_mask_or_epi32(hi, (__mmask16)(h >> 16), hi, _mm512_set1_epi32(16));
    }
    const __m512 o = _mm512_set1_ps(gg_exact_offset(type));
    const __m512 q0 = _mm512_sub_ps(_mm512_cvtepi32_ps(lo), o), q1 = _mm512_sub_ps(_mm512_cvtepi32_ps(hi), o);
    if (gg_has_centre(type)) {
        const __m512 av = _mm512_set1_ps(a[b]);
        *w0 = _mm512_fmadd_ps(q0, sv, av);
        *w1 = _mm512_fmadd_ps(q1, sv, av);
    } else {
        *w0 = _mm512_mul_ps(q0, sv);
        *w1 = _mm512_mul_ps(q1, sv);
    }
}

#define GGF_NB 4
#define GGF_MB 4

/* nb weight rows x mb activation rows (nb <= 4 and mb <= 4, or nb <= 2 and mb <= 8: 16 accumulators at most). */
static inline __attribute__((always_inline)) void gg_f32_tile(const int type, const uint8_t *const *rows, const float *terms, int G,
                                                             const float *x, int m0, int mb, int K, int n0, int nb, float *y, int N) {
    __m512 acc[GGF_NB][2 * GGF_MB];
    for (int r = 0; r < nb; r++)
        for (int m = 0; m < mb; m++) acc[r][m] = _mm512_setzero_ps();
    if (gg_block(type) == 32) { /* a block per step; each accumulator still adds inputs k..k+15, then k+16..k+31 */
        for (int k = 0; k < K; k += 32) {
            __m512 w0[GGF_NB], w1[GGF_NB];
            for (int r = 0; r < nb; r++)
                gg_w32(type, rows[r], k, terms + (size_t)2 * r * G, terms + (size_t)(2 * r + 1) * G, &w0[r], &w1[r]);
            for (int m = 0; m < mb; m++) {
                const __m512 x0 = _mm512_loadu_ps(x + (size_t)(m0 + m) * K + k), x1 = _mm512_loadu_ps(x + (size_t)(m0 + m) * K + k + 16);
                for (int r = 0; r < nb; r++) acc[r][m] = _mm512_fmadd_ps(w1[r], x1, _mm512_fmadd_ps(w0[r], x0, acc[r][m]));
            }
        }
        for (int r = 0; r < nb; r++)
            for (int m = 0; m < mb; m++) y[(size_t)(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
        return;
    }
    for (int k = 0; k < K; k += 16) {
        __m512 wv[GGF_NB];
        for (int r = 0; r < nb; r++) wv[r] = gg_w16(type, rows[r], k, terms + (size_t)2 * r * G, terms + (size_t)(2 * r + 1) * G);
        for (int m = 0; m < mb; m++) {
            const __m512 xv = _mm512_loadu_ps(x + (size_t)(m0 + m) * K + k);
            for (int r = 0; r < nb; r++) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
    for (int r = 0; r < nb; r++)
        for (int m = 0; m < mb; m++) y[(size_t)(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

#define GGF_TILE_MB(NBV)                                                                                               \
    switch (mb) {                                                                                                      \
    case 1: gg_f32_tile(type, rows, terms, G, x, m0, 1, K, n0, NBV, y, N); break;                                      \
    case 2: gg_f32_tile(type, rows, terms, G, x, m0, 2, K, n0, NBV, y, N); break;                                      \
    case 3: gg_f32_tile(type, rows, terms, G, x, m0, 3, K, n0, NBV, y, N); break;                                      \
    default: gg_f32_tile(type, rows, terms, G, x, m0, 4, K, n0, NBV, y, N); break;                                     \
    }

/* 5..8 activation rows: 2 weight rows at a time against all of them, so each weight is decoded once. */
#define GGF_TILE_MB8(NBV)                                                                                              \
    switch (M) {                                                                                                       \
    case 5: gg_f32_tile(type, rows, terms, G, x, 0, 5, K, n0, NBV, y, N); break;                                       \
    case 6: gg_f32_tile(type, rows, terms, G, x, 0, 6, K, n0, NBV, y, N); break;                                       \
    case 7: gg_f32_tile(type, rows, terms, G, x, 0, 7, K, n0, NBV, y, N); break;                                       \
    default: gg_f32_tile(type, rows, terms, G, x, 0, 8, K, n0, NBV, y, N); break;                                      \
    }

static inline __attribute__((always_inline)) void gg_f32_range(const int type, const uint8_t *w, int rb, int K, const float *x, int M,
                                                              int r0, int r1, float *y, int N, float *terms) {
    const int G = K / gg_group(type);
    const int wide = M > GGF_MB && M <= 2 * GGF_MB, step = wide ? GGF_NB / 2 : GGF_NB;
    for (int n0 = r0; n0 < r1; n0 += step) {
        const int nb = r1 - n0 < step ? r1 - n0 : step;
        const uint8_t *rows[GGF_NB];
        slmkit_prefetch_ahead(w + (size_t)n0 * rb, (size_t)GGF_NB * rb); /* a thread's rows are contiguous */
        for (int r = 0; r < nb; r++) {
            rows[r] = w + (size_t)(n0 + r) * rb;
            gg_exact_terms(type, rows[r], K, terms + (size_t)2 * r * G, terms + (size_t)(2 * r + 1) * G);
        }
        if (wide) {
            if (nb == 1) GGF_TILE_MB8(1) else GGF_TILE_MB8(2)
            continue;
        }
        for (int m0 = 0; m0 < M; m0 += GGF_MB) { /* the nb rows stay in L1 across the activation tiles */
            const int mb = M - m0 < GGF_MB ? M - m0 : GGF_MB;
            switch (nb) {
            case 1: GGF_TILE_MB(1) break;
            case 2: GGF_TILE_MB(2) break;
            case 3: GGF_TILE_MB(3) break;
            default: GGF_TILE_MB(4) break;
            }
        }
    }
}

#define GGF_T(type) case type: gg_f32_range(type, w, rb, K, x, M, r0, r1, y, N, terms); return 0;

/* Output columns r0..r1 of y (M x N) = x (M x K) @ W^T, W a GGUF tensor in format `type` (rows of rb bytes);
 * terms: scratch for 8 K / 16 floats. Returns 0, or -2 where this build has no such kernel (then the caller
 * dequantises rows into a buffer). */
int slmkit_gg_f32_rows(int type, const uint8_t *w, int rb, int K, const float *x, int M, int r0, int r1, float *y, int N, float *terms) {
    switch (type) {
        GGF_T(GG_Q4_0)
        GGF_T(GG_Q4_1)
        GGF_T(GG_Q5_0)
        GGF_T(GG_Q5_1)
        GGF_T(GG_Q8_0)
        GGF_T(GG_Q4_K)
        GGF_T(GG_Q5_K)
        GGF_T(GG_Q6_K)
    default: return -2;
    }
}
#else
int slmkit_gg_f32_rows(int type, const uint8_t *w, int rb, int K, const float *x, int M, int r0, int r1, float *y, int N, float *terms) {
    (void)type, (void)w, (void)rb, (void)K, (void)x, (void)M, (void)r0, (void)r1, (void)y, (void)N, (void)terms;
    return -2;
}
#endif

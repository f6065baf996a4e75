/* slmkit CPU kernels: the per-instruction-set helpers (included by common.h after the ISA checks).
 *
 * The generic path (every variant but AVX-512) multiplies a 64-input chunk of weight codes as two
 * 32-byte halves `vb` (codes in 0..63, or signed int8 for Q8_0) against 32 int8 activations each:
 *
 *   vacc_dot(acc, u, x, c, G, sgn)  acc += c[0] dot(u, x) for one group of 32 (G = 32), or
 *                                   c[0] dot(u[0..16), x[0..16)) + c[1] dot(u[16..32), x[16..32)) (G = 16)
 *
 * AVX2 follows llama.cpp's mul_sum_us8_pairs_float (unsigned codes: vpmaddubsw, whose int16 pair sums
 * cannot saturate for codes < 64: 2 * 63 * 128 < 32767) and mul_sum_i8_pairs_float (signed codes:
 * the sign moved onto the activations first); NEON uses sdot; the portable one is a plain loop.
 * Numerically the variants differ from each other and from AVX-512 only in the order of fp32 additions.
 */
#ifndef SLMKIT_KERNELS_SIMD_H
#define SLMKIT_KERNELS_SIMD_H

#define SLMKIT_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)

/* An IEEE half to fp32. */
static inline float slmkit_h2f(uint16_t h) {
#if defined(__F16C__) && (defined(SLMKIT_AVX512) || defined(SLMKIT_AVX2))
    return _cvtsh_ss(h);
#elif defined(__aarch64__)
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t u;
    if (e == 0x1f) {
        u = sign | 0x7f800000u | (m << 13); /* inf, NaN */
    } else if (e) {
        u = sign | ((e + 112) << 23) | (m << 13);
    } else { /* zero or subnormal: m 2^-24 */
        const float f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* x to the nearest integer, ties to even (as vcvtps2dq in the default rounding mode), for |x| < 2^22. */
static inline float round_even(float x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return x >= 0 ? (x + magic) - magic : -((-x + magic) - magic);
}

#if !defined(SLMKIT_AVX512)
/* ------------------------------------------------------------------ 32 codes of the generic path */
#if defined(SLMKIT_AVX2)
typedef __m256i vb;
typedef __m256 vacc;

static inline vb vb_load(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
/* 16 bytes of nibbles: low nibbles then high nibbles (the 32 codes of a Q4_0-style block in input order) */
static inline vb vb_nib16(const uint8_t *p) {
    const __m128i x = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), _mm256_set1_epi8(0x0F));
}
static inline vb vb_lo4(vb a) { return _mm256_and_si256(a, _mm256_set1_epi8(0x0F)); }
static inline vb vb_hi4(vb a) { return _mm256_and_si256(_mm256_srli_epi16(a, 4), _mm256_set1_epi8(0x0F)); }
static inline vb vb_or(vb a, vb b) { return _mm256_or_si256(a, b); }
/* byte i: 16 when bit i of h is set (llama.cpp's bytes_from_bits_32) */
static inline vb vb_bits4(uint32_t h) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}
/* ((byte >> shift) & mask) << 4 per byte (mask < 2^(8 - shift)): high code bits into place */
static inline vb vb_field(vb a, int shift, int mask) {
    const __m256i f = _mm256_and_si256(_mm256_srl_epi16(a, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8((char)mask));
    return _mm256_slli_epi16(f, 4);
}
static inline vacc vacc_zero(void) { return _mm256_setzero_ps(); }
static inline vacc vacc_dot(vacc acc, vb u, const int8_t *x, const float *c, int G, int sgn) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    if (sgn) { /* |q| x sign(q): vpmaddubsw takes its first operand unsigned */
        xv = _mm256_sign_epi8(xv, u);
        u = _mm256_sign_epi8(u, u);
    }
    const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), _mm256_set1_epi16(1));
    const __m256 sc = G == 16 ? _mm256_set_m128(_mm_set1_ps(c[1]), _mm_set1_ps(c[0])) : _mm256_set1_ps(c[0]);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sc, acc);
}
static inline float vacc_sum(vacc a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else /* NEON and portable: plain arrays; the loops vectorise */
typedef struct {
    int8_t v[32];
} vb;
typedef float vacc;

static inline vb vb_load(const uint8_t *p) {
    vb r;
    memcpy(r.v, p, 32);
    return r;
}
static inline vb vb_nib16(const uint8_t *p) {
    vb r;
    for (int i = 0; i < 16; i++) {
        r.v[i] = (int8_t)(p[i] & 0x0F);
        r.v[16 + i] = (int8_t)(p[i] >> 4);
    }
    return r;
}
static inline vb vb_lo4(vb a) {
    for (int i = 0; i < 32; i++) a.v[i] = (int8_t)(a.v[i] & 0x0F);
    return a;
}
static inline vb vb_hi4(vb a) {
    for (int i = 0; i < 32; i++) a.v[i] = (int8_t)(((uint8_t)a.v[i] >> 4) & 0x0F);
    return a;
}
static inline vb vb_or(vb a, vb b) {
    for (int i = 0; i < 32; i++) a.v[i] = (int8_t)(a.v[i] | b.v[i]);
    return a;
}
static inline vb vb_bits4(uint32_t h) {
    vb r;
    for (int i = 0; i < 32; i++) r.v[i] = (int8_t)(((h >> i) & 1u) << 4);
    return r;
}
static inline vb vb_field(vb a, int shift, int mask) {
    for (int i = 0; i < 32; i++) a.v[i] = (int8_t)((((uint8_t)a.v[i] >> shift) & mask) << 4);
    return a;
}
static inline vacc vacc_zero(void) { return 0.0f; }
/* integer dot product of 16 int8 pairs (codes and activations; both fit int8 in every format) */
static inline int32_t dot16(const int8_t *u, const int8_t *x) {
#if defined(SLMKIT_NEON)
    return vaddvq_s32(vdotq_s32(vdupq_n_s32(0), vld1q_s8(u), vld1q_s8(x)));
#else
    int32_t s = 0;
    for (int i = 0; i < 16; i++) s += (int32_t)u[i] * x[i];
    return s;
#endif
}
static inline vacc vacc_dot(vacc acc, vb u, const int8_t *x, const float *c, int G, int sgn) {
    (void)sgn; /* int8 arithmetic covers signed and unsigned codes alike */
    const int32_t s0 = dot16(u.v, x), s1 = dot16(u.v + 16, x + 16);
    return G == 16 ? acc + c[0] * (float)s0 + c[1] * (float)s1 : acc + c[0] * (float)(s0 + s1);
}
static inline float vacc_sum(vacc a) { return a; }
#endif

/* sum_i a[i] b[i] - k c[i] d[i] over n values (a may be NULL: no first term); eight partial sums, so
 * the loop vectorises. The offset and centre terms of a row: centres times exact activation sums,
 * minus the code offset k times the scales times the activation code sums. */
static inline float dot_sub_f32(const float *a, const float *b, float k, const float *c, const float *d, int n) {
    float p[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) p[l] += (a ? a[i + l] * b[i + l] : 0.0f) - k * c[i + l] * d[i + l];
    for (; i < n; i++) p[0] += (a ? a[i] * b[i] : 0.0f) - k * c[i] * d[i];
    return ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
}
#endif /* !SLMKIT_AVX512 */

/* ------------------------------------------------------------------ attention over the bf16 cache */

static inline float dot_bf16(const float *q, const uint16_t *k, int hd) {
#if defined(SLMKIT_AVX512)
    if (hd % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < hd; i += 16) {
            __m512 kv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(k + i))), 16));
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv, acc);
        }
        return _mm512_reduce_add_ps(acc);
    }
#else
    if (hd % 8 == 0) { /* eight partial sums: the loop vectorises */
        float p[8] = {0};
        for (int i = 0; i < hd; i += 8)
            for (int l = 0; l < 8; l++) p[l] += q[i + l] * bf16_to_f32(k[i + l]);
        return ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
    }
#endif
    float d = 0;
    for (int i = 0; i < hd; i++) d += q[i] * bf16_to_f32(k[i]);
    return d;
}

/* o (hd) = sum_t w[t] v_t over the bf16 cache rows (stride hd); the same fused multiply-adds, in the same
 * order per output, as the scalar loop the compiler contracts to fma (where the target has fma). */
static inline void weighted_sum_bf16(float *o, const float *w, const uint16_t *v, int n, int hd) {
#if defined(SLMKIT_AVX512)
    if (hd % 16 == 0 && hd <= 256) {
        __m512 acc[16];
        for (int i = 0; i < hd / 16; i++) acc[i] = _mm512_setzero_ps();
        for (int t = 0; t < n; t++) {
            const __m512 wt = _mm512_set1_ps(w[t]);
            const uint16_t *vt = v + (size_t)t * hd;
            for (int i = 0; i < hd / 16; i++) {
                const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vt + 16 * i))), 16));
                acc[i] = _mm512_fmadd_ps(wt, x, acc[i]);
            }
        }
        for (int i = 0; i < hd / 16; i++) _mm512_storeu_ps(o + 16 * i, acc[i]);
        return;
    }
#endif
    for (int i = 0; i < hd; i++) o[i] = 0;
    for (int t = 0; t < n; t++)
        for (int i = 0; i < hd; i++) o[i] += w[t] * bf16_to_f32(v[(size_t)t * hd + i]);
}

#endif

/* slmkit CPU kernels: helpers and cross-file declarations shared by q4.c, ggml.c and decode.c.
 *
 * The three files are compiled together into one shared library per instruction set by
 * slmkit.runtime.q4kernel, which picks the variant from the CPU's flags (or SLMKIT_KERNEL):
 *
 *   -DSLMKIT_ISA_AVX512    AVX512F/BW/VL/DQ, AVX512-VNNI, F16C, FMA: vpdpbusd on 64 inputs at once
 *   -DSLMKIT_ISA_AVX2      AVX2, FMA, F16C (no AVX-512): vpmaddubsw + vpmaddwd on 32 inputs, as
 *                          llama.cpp's AVX2 mul_sum_us8_pairs_float / mul_sum_i8_pairs_float
 *   -DSLMKIT_ISA_NEON      AArch64 with the dot-product extension: sdot on 16 inputs
 *   -DSLMKIT_ISA_PORTABLE  plain C loops the compiler vectorises for the baseline target
 *
 * The AVX-512 kernels are written with its intrinsics; every other variant shares one generic path
 * built from the 32-byte helpers below (vb_* for the weight codes, vacc_* for the dot products), whose
 * AVX2, NEON and plain-C definitions differ. Activations are quantised once per input
 * (slmkit_q4_quantize: int8 per group of 32, absmax / 127, exact fp32 group sums) and shared by
 * every matmul that reads that input, whatever the weight format.
 */
#ifndef SLMKIT_KERNELS_COMMON_H
#define SLMKIT_KERNELS_COMMON_H

#if defined(SLMKIT_ISA_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__) || \
    !defined(__AVX512VNNI__) || !defined(__F16C__) || !defined(__FMA__)
#error "SLMKIT_ISA_AVX512 needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mf16c -mfma"
#endif
#define SLMKIT_AVX512 1
#define SLMKIT_ISA_NAME "avx512"
#elif defined(SLMKIT_ISA_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "SLMKIT_ISA_AVX2 needs -mavx2 -mfma -mf16c"
#endif
#if defined(__AVX512F__)
#error "the AVX2 variant must be built without AVX-512 (it would run on CPUs that lack it)"
#endif
#define SLMKIT_AVX2 1
#define SLMKIT_ISA_NAME "avx2"
#elif defined(SLMKIT_ISA_NEON)
#if !defined(__aarch64__) || !defined(__ARM_FEATURE_DOTPROD)
#error "SLMKIT_ISA_NEON needs an AArch64 target with the dot-product extension (-march=armv8.2-a+dotprod)"
#endif
#define SLMKIT_NEON 1
#define SLMKIT_ISA_NAME "neon"
#elif defined(SLMKIT_ISA_PORTABLE)
#define SLMKIT_ISA_NAME "portable"
#else
#error "define one of SLMKIT_ISA_AVX512, SLMKIT_ISA_AVX2, SLMKIT_ISA_NEON, SLMKIT_ISA_PORTABLE"
#endif

#if defined(SLMKIT_AVX512) || defined(SLMKIT_AVX2)
#include <immintrin.h>
#endif
#if defined(SLMKIT_NEON)
#include <arm_neon.h>
#endif
#include <math.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096
#endif

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as torch's .to(bfloat16) */
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(SLMKIT_AVX512)
static inline __m512 load16(const void *x, int bf16, int off) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + off));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)x + off);
}

/* 16 fp32 values to bf16 (round to nearest even, as torch), stored at out. */
static inline void store_bf16x16(uint16_t *out, __m512 w) {
    __m512i u = _mm512_castps_si512(w);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
#endif

#include "simd.h"

/* Prefetch the `bytes` bytes that start PREFETCH_BYTES past p: the weight rows a thread streams through in order
 * (a prefetch past the end of a tensor never faults). */
static inline void slmkit_prefetch_ahead(const uint8_t *p, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) SLMKIT_PREFETCH(p + PREFETCH_BYTES + off);
}

/* Most inputs a row may have (K, D, F, H * hd): every entry point refuses larger ones, so the
 * fixed stack arrays sized from it (per-row scales, 16 KB for 4096 groups) are bounded. */
#define SLMKIT_MAX_K 65536

/* Per-thread scratch (q4.c): slot `slot` of the calling thread grown to at least `bytes` (64-byte
 * aligned; NULL when out of memory). Each thread's buffers are freed when it exits (a pthread key
 * destructor) or by slmkit_scratch_release() (the caller's, and its OpenMP team's when called outside a parallel
 * region with the team size the matmuls used); slots are owned by one entry point each. */
enum { SCR_Q4 = 0, SCR_GG = 4, SCR_DEC = 11, SCR_GF = 20, SCR_Q4T = 21, SCR_N = 22 };

/* This thread's share [*lo, *hi) of n work items, contiguous and as even as OpenMP's schedule(static) makes them;
 * all of them outside a parallel region. For loops whose body wants the whole share in one call. */
static inline void slmkit_share(int n, int *lo, int *hi) {
#if defined(_OPENMP)
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
    const int nt = 1, id = 0;
#endif
    const int q = n / nt, r = n % nt;
    *lo = id * q + (id < r ? id : r);
    *hi = *lo + q + (id < r);
}
void *slmkit_scratch(int slot, size_t bytes);
size_t slmkit_scratch_live_bytes(void);
void slmkit_scratch_release(void);

#if defined(SLMKIT_AVX512)
/* Superblocks (q4.c explains them): 16 groups of 32 inputs, the codes of 8 chunks of 64
 * transposed in registers so that register p holds dword p (inputs 4p..4p+3) of every group, dword g for
 * group g. A chunk's register holds groups 2c, 2c + 1 as dwords 8h + p; three perfect shuffles (the even
 * dwords of a pair of registers to the first, the odd ones to the second, pairing registers 1, 2 and 4
 * apart) turn the 16 x 8 dword matrix around. */
#define SB 512
static inline void slmkit_transpose_sb(__m512i v[8]) {
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int st = 1; st < 8; st <<= 1)
        for (int a = 0; a < 8; a++)
            if (!(a & st)) {
                const __m512i lo = _mm512_permutex2var_epi32(v[a], ev, v[a + st]);
                v[a + st] = _mm512_permutex2var_epi32(v[a], od, v[a + st]);
                v[a] = lo;
            }
}

/* The superblocks of M quantised activation rows (K inputs each) transposed as the codes are: xqt holds
 * M x (K / SB) blocks of SB bytes. */
static inline void slmkit_transpose_acts(const int8_t *xq, int M, int K, int8_t *xqt) {
    const int nsb = K / SB;
    for (int t = 0; t < M; t++)
        for (int b = 0; b < nsb; b++) {
            const int8_t *src = xq + (size_t)t * K + (size_t)b * SB;
            int8_t *dst = xqt + ((size_t)t * nsb + b) * SB;
            __m512i v[8];
            for (int c = 0; c < 8; c++) v[c] = _mm512_loadu_si512((const void *)(src + 64 * c));
            slmkit_transpose_sb(v);
            for (int c = 0; c < 8; c++) _mm512_storeu_si512((void *)(dst + 64 * c), v[c]);
        }
}

/* Eight dot products of a superblock's transposed codes v with one token's transposed activations xt: each
 * group's whole integer sum in its lane. */
static inline __m512i slmkit_sb_dots(const __m512i v[8], const int8_t *xt) {
    __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], _mm512_loadu_si512((const void *)xt));
    __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[1], _mm512_loadu_si512((const void *)(xt + 64)));
    for (int c = 2; c < 8; c += 2) {
        i0 = _mm512_dpbusd_epi32(i0, v[c], _mm512_loadu_si512((const void *)(xt + 64 * c)));
        i1 = _mm512_dpbusd_epi32(i1, v[c + 1], _mm512_loadu_si512((const void *)(xt + 64 * c + 64)));
    }
    return _mm512_add_epi32(i0, i1);
}
#endif

/* ---- q4.c: slmkit's own 4-bit layout */

/* Rows of x (M x K) to int8 per group of 32: codes xq (M x K), scales xs and exact sums xsum (M x K/32),
 * and the q4 centring correction xcorr = 8 * xs * sum(xq). */
void slmkit_q4_quantize(const void *x, int bf16, int M, int K, int8_t *xq, float *xs, float *xsum, float *xcorr);

/* y[t, r] for t < M, r0 <= r < r1 of the q4 weight (q, s, m) times quantised activations; y row stride ldy. */
void slmkit_q4_rows(const uint8_t *q, const uint16_t *s, const uint16_t *m, int K, const int8_t *xq, const float *xs,
                    const float *xsum, const float *xcorr, int M, int r0, int r1, void *y, int ldy, int y_bf16);

/* ---- ggml.c: llama.cpp's GGUF block formats, read from the file's bytes */

/* What the GGUF matmuls read: the int8 codes, scales and exact sums of the activations (per 32, from
 * slmkit_q4_quantize) and, per token, derived by slmkit_gg_prepare: scale x code sum per 32 (xc32) and
 * per 16 inputs (xc16), and the scale per 16 inputs (xs16). */
typedef struct {
    const int8_t *xq;
    const float *xs, *xsum, *xc32, *xc16, *xs16;
} slmkit_gg_act;

int slmkit_gg_row_bytes(int type, int K);
void slmkit_gg_prepare(const int8_t *xq, const float *xs, int M, int K, float *xc32, float *xc16, float *xs16);
void slmkit_gg_rows(int type, const uint8_t *w, int K, const slmkit_gg_act *a, int M, int r0, int r1, void *y, int ldy, int y_bf16);
/* One row dequantised to fp32 exactly as gguf-py does (what transformers holds after loading the file). */
int slmkit_gg_row_exact(int type, const uint8_t *row, int K, float *out);
/* Columns r0..r1 of x @ W^T straight from the blocks (AVX-512; -2 elsewhere); terms: scratch of 8 K / 16 floats. */
int slmkit_gg_f32_rows(int type, const uint8_t *w, int rb, int K, const float *x, int M, int r0, int r1, float *y, int N, float *terms);

#endif

/* slmkit: 4-bit weight x 8-bit activation matmul for CPU decode (AVX512-VNNI; AVX2, NEON and plain C
 * through the generic path of common.h / simd.h).
 *
 * The scheme is llama.cpp's Q4_1 x Q8 dot product (Gerganov et al., ggml): weights are stored
 * per group of 32 input channels as 4-bit codes q in 0..15 with an fp16 scale s and centre m
 * (w = (q - 8) * s + m); each activation row is quantised on the fly to int8 per group of 32
 * (x ~ xq * xs, absmax / 127). Then
 *
 *     y = sum_groups  s * xs * (dot(q, xq) - 8 sum(xq))  +  m * sum(x)
 *
 * where dot(q, xq) is an unsigned-by-signed int8 dot product (vpdpbusd, 64 products per
 * instruction) and sum(x) is the exact fp32 sum of the group's activations. Centring the codes
 * (rather than llama.cpp's w = q * s + min) keeps the activation rounding error proportional to
 * the weight, not to the weight's distance from its group minimum.
 *
 * Layout of one weight matrix (N outputs, K inputs, K % 64 == 0):
 *   q  N * K/2 bytes; for each 64-wide chunk c of a row, byte j (0..31) holds the code of input
 *      64c + j in its low nibble and of input 64c + 32 + j in its high nibble, so that a chunk
 *      unpacks into one 64-byte register in input order with an and, a shift and an insert;
 *   s, m  N * K/32 fp16 each.
 *
 * Built by slmkit.runtime.q4kernel with cc -O3 and one instruction set's flags (with ggml.c and decode.c,
 * into one library per variant); loaded with ctypes. The fused decode step that uses these matmuls is in decode.c.
 * Threads: OpenMP, which resolves to the libgomp torch already loaded (same thread count).
 */
#include "common.h"

#include <pthread.h>

/* ------------------------------------------------------------------ per-thread scratch
 *
 * Each calling thread (a server's request threads included) keeps its buffers between calls, and
 * they go with the thread: a pthread key destructor frees them at thread exit (they used to be
 * __thread pointers, never freed, so every finished request thread leaked its scratch). */
typedef struct {
    void *p[SCR_N];
    size_t cap[SCR_N];
} scratch_t;

static pthread_key_t scr_key;
static pthread_once_t scr_once = PTHREAD_ONCE_INIT;
static int scr_key_ok;
static size_t scr_live; /* bytes held by every thread together (atomic) */

static void scr_free(void *v) {
    scratch_t *s = (scratch_t *)v;
    for (int i = 0; i < SCR_N; i++) {
        free(s->p[i]);
        __atomic_sub_fetch(&scr_live, s->cap[i], __ATOMIC_RELAXED);
    }
    free(s);
}

static void scr_init(void) { scr_key_ok = pthread_key_create(&scr_key, scr_free) == 0; }

void *slmkit_scratch(int slot, size_t bytes) {
    pthread_once(&scr_once, scr_init);
    if (!scr_key_ok || slot < 0 || slot >= SCR_N) return NULL;
    scratch_t *s = (scratch_t *)pthread_getspecific(scr_key);
    if (!s) {
        s = (scratch_t *)calloc(1, sizeof *s);
        if (!s) return NULL;
        if (pthread_setspecific(scr_key, s)) { free(s); return NULL; }
    }
    if (s->p[slot] && bytes <= s->cap[slot]) return s->p[slot];
    free(s->p[slot]);
    __atomic_sub_fetch(&scr_live, s->cap[slot], __ATOMIC_RELAXED);
    const size_t cap = bytes ? (bytes + 63) / 64 * 64 : 64;
    s->p[slot] = aligned_alloc(64, cap);
    s->cap[slot] = s->p[slot] ? cap : 0;
    __atomic_add_fetch(&scr_live, s->cap[slot], __ATOMIC_RELAXED);
    return s->p[slot];
}

size_t slmkit_scratch_live_bytes(void) { return __atomic_load_n(&scr_live, __ATOMIC_RELAXED); }

/* Free the calling thread's scratch now, and that of the OpenMP team it starts (the matmuls' worker threads keep
 * the transposed activations of slmkit_q4_rows); each is recreated on its thread's next call. */
void slmkit_scratch_release(void) {
    pthread_once(&scr_once, scr_init);
    if (!scr_key_ok) return;
#pragma omp parallel
    {
        scratch_t *s = (scratch_t *)pthread_getspecific(scr_key);
        if (s) {
            pthread_setspecific(scr_key, NULL);
            scr_free(s);
        }
    }
}

#if defined(SLMKIT_AVX512)
/* Quantise rows of x (M x K, fp32 or bf16) to int8 per group of 32: codes, scales, exact sums,
 * and the centring correction 8 * xs * sum(xq). */
void slmkit_q4_quantize(const void *x, int bf16, int M, int K, int8_t *xq, float *xs, float *xsum, float *xcorr) {
    const int nb = K / GROUP;
    for (int t = 0; t < M; t++) {
        for (int b = 0; b < nb; b++) {
            const int off = t * K + b * GROUP;
            __m512 a = load16(x, bf16, off), c = load16(x, bf16, off + 16);
            __m512 amax = _mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c));
            float mx = _mm512_reduce_max_ps(amax);
            float d = mx / 127.0f, inv = mx > 0 ? 127.0f / mx : 0.0f;
            __m512 vi = _mm512_set1_ps(inv);
            __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vi)); /* round to nearest even */
            __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, vi));
            _mm_storeu_si128((__m128i *)(xq + off), _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(xq + off + 16), _mm512_cvtsepi32_epi8(qc));
            xs[t * nb + b] = d;
            xsum[t * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
            xcorr[t * nb + b] = 8.0f * d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
        }
    }
}
#else
/* Quantise rows of x (M x K, fp32 or bf16) to int8 per group of 32: codes, scales, exact sums,
 * and the centring correction 8 * xs * sum(xq) (the same values as the AVX-512 build but for the
 * order of the fp32 sums). The product x * (127 / absmax) is rounded to fp32 before it is rounded to an
 * integer, as vcvtps2dq sees it: contracting the two into one fma would round the exact product and
 * change a code now and then (a separate statement for clang, the attribute for gcc). */
__attribute__((optimize("fp-contract=off"))) void slmkit_q4_quantize(const void *x, int bf16, int M, int K, int8_t *xq, float *xs, float *xsum, float *xcorr) {
    const int nb = K / GROUP;
    float v[GROUP];
    for (int t = 0; t < M; t++) {
        for (int b = 0; b < nb; b++) {
            const size_t off = (size_t)t * K + (size_t)b * GROUP;
            if (bf16)
                for (int i = 0; i < GROUP; i++) v[i] = bf16_to_f32(((const uint16_t *)x)[off + i]);
            else
                memcpy(v, (const float *)x + off, sizeof v);
            float mx = 0, sum = 0;
            for (int i = 0; i < GROUP; i++) {
                const float av = fabsf(v[i]);
                mx = av > mx ? av : mx;
                sum += v[i];
            }
            const float d = mx / 127.0f, inv = mx > 0 ? 127.0f / mx : 0.0f;
            int32_t qs = 0;
            for (int i = 0; i < GROUP; i++) {
                const float y = v[i] * inv;
                float r = round_even(y);
                r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
                xq[off + i] = (int8_t)r;
                qs += (int8_t)r;
            }
            xs[(size_t)t * nb + b] = d;
            xsum[(size_t)t * nb + b] = sum;
            xcorr[(size_t)t * nb + b] = 8.0f * d * (float)qs;
        }
    }
}
#endif

#if defined(SLMKIT_AVX512)
/* Superblocks: 16 groups (512 inputs) of a row are multiplied as one register of 16 per-group int32 sums.
 *
 * A chunk unpacks into a register whose dword 8h + p holds inputs 4p..4p+3 of group 2c + h; so one
 * vpdpbusd yields 8 partial sums per group and each would need its own conversion and scale. Eight
 * chunks (one superblock) are transposed in registers instead (slmkit_transpose_sb, common.h), so that
 * register p holds dword p of every group (dword g: group g); eight vpdpbusd then accumulate each group's
 * whole integer dot product in lane g, and one conversion, one scale product and one fma per superblock
 * and token remain (was: one each per chunk and token). The activations are transposed the same way once
 * per call (slmkit_transpose_acts), so the weight transposition is shared by every token of the call. Each
 * token's arithmetic does not depend on how many tokens share the call (batch invariance of the server). */
#define PASS_TOKENS 8 /* tokens per pass over the weights */

/* The 64 codes of the 64-wide chunk at p (32 bytes, layout above) in input order, one byte each. */
static inline __m512i q4_chunk(const uint8_t *p) {
    const __m256i lowmask = _mm256_set1_epi8(0x0F), raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, lowmask)),
                              _mm256_and_si256(_mm256_srli_epi16(raw, 4), lowmask), 1);
}

/* T tokens (1..PASS_TOKENS) against rows [r0, r1): y[t, r]. The first nsb superblocks of each row use the
 * transposed activations xqt (M rows of nsb blocks; any nsb <= K / SB); the remaining groups go chunk by chunk. */
static inline void rows_kernel(const uint8_t *q, const uint16_t *s, const uint16_t *m, int K, const int8_t *xq,
                               const int8_t *xqt, int nsb, const float *xs, const float *xsum, const float *xcorr,
                               int T, int r0, int r1, void *out, int ldo, int out_bf16) {
    const int nb = K / GROUP, g0 = nsb * (SB / GROUP), sbs = K / SB;
    float comb[PASS_TOKENS][SB / GROUP]; /* the chunked tail: s_b * xs_b per token (fewer than 16 groups, or all without xqt) */
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = q + (size_t)r * (K / 2);
        const uint16_t *sr = s + (size_t)r * nb, *mr = m + (size_t)r * nb;
        __m512 acc[PASS_TOKENS];
        for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
        for (int b = 0; b < nsb; b++) {
            __m512i v[8];
            for (int c = 0; c < 8; c++) {
                const uint8_t *p = qr + (size_t)b * (SB / 2) + 32 * c;
                _mm_prefetch((const char *)p + PREFETCH_BYTES, _MM_HINT_T0); /* rows stream: fetch ahead */
                v[c] = q4_chunk(p);
            }
            slmkit_transpose_sb(v);
            const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sr + b * 16)));
            const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mr + b * 16)));
            for (int t = 0; t < T; t++) {
                const __m512i dots = slmkit_sb_dots(v, xqt + ((size_t)t * sbs + b) * SB);
                const size_t f = (size_t)t * nb + (size_t)b * 16;
                const __m512 sc = _mm512_mul_ps(sv, _mm512_loadu_ps(xs + f));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), sc, acc[t]);
                acc[t] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(xsum + f), _mm512_fnmadd_ps(sv, _mm512_loadu_ps(xcorr + f), acc[t]));
            }
        }
        /* the groups after the superblocks, two per 64-wide chunk: per-chunk sums, as llama.cpp's Q4_1 x Q8_1 */
        for (int b = g0; b < nb; b += 16) {
            __mmask16 k = nb - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - b)) - 1);
            __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sr + b));
            __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mr + b));
            for (int t = 0; t < T; t++) {
                __m512 xsv = _mm512_maskz_loadu_ps(k, xs + t * nb + b);
                __m512 xsumv = _mm512_maskz_loadu_ps(k, xsum + t * nb + b);
                __m512 xcv = _mm512_maskz_loadu_ps(k, xcorr + t * nb + b);
                _mm512_storeu_ps(comb[t], _mm512_mul_ps(sv, xsv));
                acc[t] = _mm512_fmadd_ps(mv, xsumv, _mm512_fnmadd_ps(sv, xcv, acc[t]));
            }
            const int c1 = (b + 16 < nb ? b + 16 : nb) / 2;
            for (int c = b / 2; c < c1; c++) {
                _mm_prefetch((const char *)(qr + 32 * c) + PREFETCH_BYTES, _MM_HINT_T0);
                const __m512i w = q4_chunk(qr + 32 * c);
                const int j = 2 * c - b;
                for (int t = 0; t < T; t++) {
                    __m512i xv = _mm512_loadu_si512((const void *)(xq + (size_t)t * K + 64 * c));
                    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
                    __m512 sc = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcast_ss(comb[t] + j)),
                                                   _mm256_broadcast_ss(comb[t] + j + 1), 1);
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[t]);
                }
            }
        }
        for (int t = 0; t < T; t++) {
            float v = _mm512_reduce_add_ps(acc[t]);
            if (out_bf16) ((uint16_t *)out)[(size_t)t * ldo + r] = f32_to_bf16(v);
            else ((float *)out)[(size_t)t * ldo + r] = v;
        }
    }
}
#else
/* T tokens (1..4) against rows [r0, r1): the generic path (simd.h), two 32-input groups per chunk. */
#define PASS_TOKENS 4 /* tokens per pass over the weights */

/* (xqt and nsb: the avx512 build's superblocks; unused here.) */
static inline void rows_kernel(const uint8_t *q, const uint16_t *s, const uint16_t *m, int K, const int8_t *xq,
                               const int8_t *xqt, int nsb, const float *xs, const float *xsum, const float *xcorr,
                               int T, int r0, int r1, void *out, int ldo, int out_bf16) {
    (void)xqt, (void)nsb;
    const int nb = K / GROUP, nc = K / 64;
    float comb[4][SLMKIT_MAX_K / GROUP], sf[SLMKIT_MAX_K / GROUP], mf[SLMKIT_MAX_K / GROUP];
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = q + (size_t)r * (K / 2);
        const uint16_t *sr = s + (size_t)r * nb, *mr = m + (size_t)r * nb;
        for (int b = 0; b < nb; b++) {
            sf[b] = slmkit_h2f(sr[b]);
            mf[b] = slmkit_h2f(mr[b]);
        }
        vacc acc[4];
        float off[4];
        for (int t = 0; t < T; t++) {
            for (int b = 0; b < nb; b++) comb[t][b] = sf[b] * xs[t * nb + b];
            /* m sum(x) - s 8 xs sum(xq): the centres and the code offset */
            off[t] = dot_sub_f32(mf, xsum + t * nb, 1.0f, sf, xcorr + t * nb, nb);
            acc[t] = vacc_zero();
        }
        for (int c = 0; c < nc; c++) {
            SLMKIT_PREFETCH(qr + 32 * c + PREFETCH_BYTES); /* rows stream: fetch ahead */
            const vb raw = vb_load(qr + 32 * c), lo = vb_lo4(raw), hi = vb_hi4(raw);
            for (int t = 0; t < T; t++) {
                const int8_t *xt = xq + (size_t)t * K + 64 * c;
                acc[t] = vacc_dot(acc[t], lo, xt, comb[t] + 2 * c, 32, 0);
                acc[t] = vacc_dot(acc[t], hi, xt + 32, comb[t] + 2 * c + 1, 32, 0);
            }
        }
        for (int t = 0; t < T; t++) {
            const float v = vacc_sum(acc[t]) + off[t];
            if (out_bf16) ((uint16_t *)out)[(size_t)t * ldo + r] = f32_to_bf16(v);
            else ((float *)out)[(size_t)t * ldo + r] = v;
        }
    }
}
#endif

/* Rows [r0, r1) of y (M x N, row stride ldy) = W x for activations already quantised, PASS_TOKENS tokens at a time,
 * 8 rows at a time with every token pass over them while they are in cache. The avx512 build transposes the
 * activations' superblocks once per call (into this thread's scratch), so a caller should pass each thread's whole
 * share of rows in one call; without the scratch every group goes chunk by chunk (the same values within fp32
 * rounding). */
void slmkit_q4_rows(const uint8_t *q, const uint16_t *s, const uint16_t *m, int K, const int8_t *xq, const float *xs,
                    const float *xsum, const float *xcorr, int M, int r0, int r1, void *y, int ldy, int y_bf16) {
    const int nb = K / GROUP;
    int8_t *xqt = NULL;
    size_t xqt_row = 0; /* transposed bytes per token */
    int nsb = 0;        /* superblocks per row read from xqt */
#if defined(SLMKIT_AVX512)
    xqt_row = (size_t)(K / SB) * SB;
    if (xqt_row && (xqt = (int8_t *)slmkit_scratch(SCR_Q4T, (size_t)M * xqt_row))) {
        slmkit_transpose_acts(xq, M, K, xqt);
        nsb = K / SB;
    }
#endif
    for (int ra = r0; ra < r1; ra += 8) {
        const int rb = ra + 8 < r1 ? ra + 8 : r1;
        for (int t0 = 0; t0 < M; t0 += PASS_TOKENS) {
            const int T = M - t0 < PASS_TOKENS ? M - t0 : PASS_TOKENS;
            const int8_t *xqa = xq + (size_t)t0 * K, *xqb = xqt ? xqt + (size_t)t0 * xqt_row : NULL;
            const float *xst = xs + (size_t)t0 * nb, *xsumt = xsum + (size_t)t0 * nb, *xct = xcorr + (size_t)t0 * nb;
            void *o = y_bf16 ? (void *)((uint16_t *)y + (size_t)t0 * ldy) : (void *)((float *)y + (size_t)t0 * ldy);
#define ROWS(n) rows_kernel(q, s, m, K, xqa, xqb, nsb, xst, xsumt, xct, n, ra, rb, o, ldy, y_bf16)
            switch (T) {
            case 1: ROWS(1); break;
            case 2: ROWS(2); break;
            case 3: ROWS(3); break;
#if PASS_TOKENS > 4
            case 4: ROWS(4); break;
            case 5: ROWS(5); break;
            case 6: ROWS(6); break;
            case 7: ROWS(7); break;
#endif
            default: ROWS(PASS_TOKENS); break;
            }
#undef ROWS
        }
    }
}

/* y (M x N) = W x for activations already quantised, rows split across the team in contiguous shares of whole
 * 8-row tiles (one slmkit_q4_rows call per thread: it transposes the activations once); outside a parallel
 * region the calling thread does every row. */
static void mm_tiles(const uint8_t *q, const uint16_t *s, const uint16_t *m, int K, const int8_t *xq, const float *xs,
                     const float *xsum, const float *xcorr, int M, int N, void *y, int y_bf16) {
    const int tile = 8;
    int lo, hi;
    slmkit_share((N + tile - 1) / tile, &lo, &hi);
    if (lo < hi)
        slmkit_q4_rows(q, s, m, K, xq, xs, xsum, xcorr, M, lo * tile, hi * tile < N ? hi * tile : N, y, N, y_bf16);
}

/* y (M x N) = x (M x K) @ W^T. x and y are fp32, or bf16 when the flag is set. Returns 0 on success. */
int slmkit_q4_matmul(const void *x, int x_bf16, int M, int K, const uint8_t *q, const uint16_t *s,
                     const uint16_t *m, int N, void *y, int y_bf16) {
    if (K % 64 || K > SLMKIT_MAX_K || M < 0 || N < 0) return -2;
    const size_t mk = (size_t)M * K, mb = mk / GROUP;
    int8_t *xq = (int8_t *)slmkit_scratch(SCR_Q4, mk);
    float *xs = (float *)slmkit_scratch(SCR_Q4 + 1, 4 * mb), *xsum = (float *)slmkit_scratch(SCR_Q4 + 2, 4 * mb);
    float *xcorr = (float *)slmkit_scratch(SCR_Q4 + 3, 4 * mb);
    if (!xq || !xs || !xsum || !xcorr) return -1;
    slmkit_q4_quantize(x, x_bf16, M, K, xq, xs, xsum, xcorr);
#pragma omp parallel
    mm_tiles(q, s, m, K, xq, xs, xsum, xcorr, M, N, y, y_bf16);
    return 0;
}

/* ------------------------------------------------------------------ dequantisation for long prompts
 *
 * A prompt of many tokens is compute-bound, not bandwidth-bound: there a bf16 matmul (AMX on CPUs
 * that have it) beats the int8 dot products. This writes the bf16 weight (N x K) the codes stand for.
 */
#if defined(SLMKIT_AVX512)
void slmkit_q4_dequant_bf16(const uint8_t *q, const uint16_t *s, const uint16_t *m, int N, int K, uint16_t *out) {
    const int nb = K / GROUP, nc = K / 64;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        const uint8_t *qr = q + (size_t)r * (K / 2);
        uint16_t *o = out + (size_t)r * K;
        for (int c = 0; c < nc; c++) {
            uint8_t codes[64];
            _mm512_storeu_si512((void *)codes, q4_chunk(qr + 32 * c));
            for (int half = 0; half < 2; half++) { /* group 2c + half: 32 codes */
                const int b = 2 * c + half;
                const float sv = _cvtsh_ss(s[(size_t)r * nb + b]), mv = _cvtsh_ss(m[(size_t)r * nb + b]);
                const __m512 vs = _mm512_set1_ps(sv), vm = _mm512_set1_ps(mv - 8.0f * sv);
                for (int j = 0; j < 32; j += 16) {
                    __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * half + j))));
                    store_bf16x16(o + 64 * c + 32 * half + j, _mm512_fmadd_ps(w, vs, vm));
                }
            }
        }
    }
}
#else
void slmkit_q4_dequant_bf16(const uint8_t *q, const uint16_t *s, const uint16_t *m, int N, int K, uint16_t *out) {
    const int nb = K / GROUP, nc = K / 64;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        const uint8_t *qr = q + (size_t)r * (K / 2);
        uint16_t *o = out + (size_t)r * K;
        for (int c = 0; c < nc; c++)
            for (int half = 0; half < 2; half++) { /* group 2c + half: low nibbles, then high */
                const int b = 2 * c + half;
                const float sv = slmkit_h2f(s[(size_t)r * nb + b]), mv = slmkit_h2f(m[(size_t)r * nb + b]) - 8.0f * sv;
                for (int j = 0; j < 32; j++) {
                    const int code = half ? qr[32 * c + j] >> 4 : qr[32 * c + j] & 0x0F;
                    o[64 * c + 32 * half + j] = f32_to_bf16((float)code * sv + mv);
                }
            }
    }
}
#endif

/* Which instruction set this library was built for ("avx512", "avx2", "neon" or "portable"). */
const char *slmkit_kernel_isa(void) { return SLMKIT_ISA_NAME; }

/* slmkit: 4-bit weight x 8-bit activation matmul for CPU decode (AVX512-VNNI).
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
 * Built by slmkit.runtime.q4kernel with g++ -O3 and the AVX512 flags; loaded with ctypes.
 * Threads: OpenMP, which resolves to the libgomp torch already loaded (same thread count).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096
#endif

static inline __m512 load16(const void *x, int bf16, int off) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + off));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)x + off);
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as torch's .to(bfloat16) */
    return (uint16_t)(u >> 16);
}

/* Per-thread scratch for the quantised activations (grown on demand). */
static __thread int8_t *t_xq;
static __thread float *t_xs, *t_xsum, *t_xcorr;
static __thread size_t t_cap;

static int scratch(size_t mk) {
    if (mk <= t_cap) return 0;
    free(t_xq); free(t_xs); free(t_xsum); free(t_xcorr);
    t_xq = (int8_t *)aligned_alloc(64, (mk + 63) / 64 * 64);
    t_xs = (float *)aligned_alloc(64, ((mk / GROUP) * 4 + 15) / 16 * 64);
    t_xsum = (float *)aligned_alloc(64, ((mk / GROUP) * 4 + 15) / 16 * 64);
    t_xcorr = (float *)aligned_alloc(64, ((mk / GROUP) * 4 + 15) / 16 * 64);
    if (!t_xq || !t_xs || !t_xsum || !t_xcorr) { t_cap = 0; return -1; }
    t_cap = mk;
    return 0;
}

/* Quantise rows of x (M x K, fp32 or bf16) to int8 per group of 32: codes, scales, exact sums,
 * and the centring correction 8 * xs * sum(xq). */
static void quantize(const void *x, int bf16, int M, int K, int8_t *xq, float *xs, float *xsum, float *xcorr) {
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

/* T tokens (1..4) against rows [r0, r1): y[t, r] for the given tokens. */
static inline void rows_kernel(const uint8_t *q, const uint16_t *s, const uint16_t *m, int K,
                               const int8_t *xq, const float *xs, const float *xsum, const float *xcorr, int T,
                               int r0, int r1, void *out, int ldo, int out_bf16) {
    const int nb = K / GROUP, nc = K / 64;
    const __m256i lowmask = _mm256_set1_epi8(0x0F);
    float comb[4][2048]; /* s_b * xs_b per token (K <= 65536) */
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = q + (size_t)r * (K / 2);
        const uint16_t *sr = s + (size_t)r * nb, *mr = m + (size_t)r * nb;
        /* fp16 scales and centres of the row to fp32; combined scales; the offset terms start the sums */
        __m512 acc[4];
        for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b += 16) {
            __mmask16 k = nb - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - b)) - 1);
            __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sr + b));
            __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mr + b));
            for (int t = 0; t < T; t++) {
                __m512 xsv = _mm512_maskz_loadu_ps(k, xs + t * nb + b);
                __m512 xsumv = _mm512_maskz_loadu_ps(k, xsum + t * nb + b);
                __m512 xcv = _mm512_maskz_loadu_ps(k, xcorr + t * nb + b);
                _mm512_mask_storeu_ps(comb[t] + b, k, _mm512_mul_ps(sv, xsv));
                acc[t] = _mm512_fmadd_ps(mv, xsumv, _mm512_fnmadd_ps(sv, xcv, acc[t]));
            }
        }
        for (int c = 0; c < nc; c++) {
            _mm_prefetch((const char *)(qr + 32 * c) + PREFETCH_BYTES, _MM_HINT_T0); /* rows stream: fetch ahead */
            __m256i raw = _mm256_loadu_si256((const __m256i *)(qr + 32 * c));
            __m256i lo = _mm256_and_si256(raw, lowmask);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lowmask);
            __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            for (int t = 0; t < T; t++) {
                __m512i xv = _mm512_loadu_si512((const void *)(xq + (size_t)t * K + 64 * c));
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
                __m512 sc = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcast_ss(comb[t] + 2 * c)),
                                               _mm256_broadcast_ss(comb[t] + 2 * c + 1), 1);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[t]);
            }
        }
        for (int t = 0; t < T; t++) {
            float v = _mm512_reduce_add_ps(acc[t]);
            if (out_bf16) ((uint16_t *)out)[(size_t)t * ldo + r] = f32_to_bf16(v);
            else ((float *)out)[(size_t)t * ldo + r] = v;
        }
    }
}

/* The row tiles of y (M x N) = W x for activations already quantised; an orphaned worksharing loop:
 * inside a parallel region the team splits the tiles (implicit barrier at the end), outside one it runs
 * on the calling thread. */
static void mm_tiles(const uint8_t *q, const uint16_t *s, const uint16_t *m, int K, const int8_t *xq, const float *xs,
                     const float *xsum, const float *xcorr, int M, int N, void *y, int y_bf16) {
    const int nb = K / GROUP;
    const int tile = 8; /* rows per work item */
    const int ntiles = (N + tile - 1) / tile;
#pragma omp for schedule(static)
    for (int it = 0; it < ntiles; it++) {
        int r0 = it * tile, r1 = r0 + tile < N ? r0 + tile : N;
        for (int t0 = 0; t0 < M; t0 += 4) {
            int T = M - t0 < 4 ? M - t0 : 4;
            const int8_t *xqt = xq + (size_t)t0 * K;
            const float *xst = xs + (size_t)t0 * nb, *xsumt = xsum + (size_t)t0 * nb, *xct = xcorr + (size_t)t0 * nb;
            void *o = y_bf16 ? (void *)((uint16_t *)y + (size_t)t0 * N) : (void *)((float *)y + (size_t)t0 * N);
            switch (T) {
            case 1: rows_kernel(q, s, m, K, xqt, xst, xsumt, xct, 1, r0, r1, o, N, y_bf16); break;
            case 2: rows_kernel(q, s, m, K, xqt, xst, xsumt, xct, 2, r0, r1, o, N, y_bf16); break;
            case 3: rows_kernel(q, s, m, K, xqt, xst, xsumt, xct, 3, r0, r1, o, N, y_bf16); break;
            default: rows_kernel(q, s, m, K, xqt, xst, xsumt, xct, 4, r0, r1, o, N, y_bf16); break;
            }
        }
    }
}

/* y (M x N) = x (M x K) @ W^T. x and y are fp32, or bf16 when the flag is set. Returns 0 on success. */
int slmkit_q4_matmul(const void *x, int x_bf16, int M, int K, const uint8_t *q, const uint16_t *s,
                     const uint16_t *m, int N, void *y, int y_bf16) {
    if (K % 64 || K > 65536) return -2;
    if (scratch((size_t)M * K)) return -1;
    int8_t *xq = t_xq;
    float *xs = t_xs, *xsum = t_xsum, *xcorr = t_xcorr;
    quantize(x, x_bf16, M, K, xq, xs, xsum, xcorr);
#pragma omp parallel
    mm_tiles(q, s, m, K, xq, xs, xsum, xcorr, M, N, y, y_bf16);
    return 0;
}

/* ------------------------------------------------------------------ one fused decode step
 *
 * One token of a llama decoder through every layer without returning to Python: RMSNorm,
 * fused q/k/v projection, RoPE (rotate-half form, as transformers), the new k/v written to a
 * bf16 cache of layout (L, Hk, S, hd), grouped-query attention over positions 0..pos, output
 * projection, residual, RMSNorm, fused gate/up, SiLU(gate) * up, down projection, residual.
 * The residual stream and every intermediate stay fp32; the matmuls are the q4 kernel above.
 */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void rmsnorm(const float *x, const uint16_t *w, int D, float eps, float *out) {
    double ss = 0;
    for (int i = 0; i < D; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / D) + eps);
    for (int i = 0; i < D; i++) out[i] = x[i] * r * bf16_to_f32(w[i]);
}

static void rope(float *v, int heads, int hd, const float *cos, const float *sin) {
    const int h2 = hd / 2;
    for (int h = 0; h < heads; h++) {
        float *p = v + (size_t)h * hd;
        for (int i = 0; i < h2; i++) {
            float a = p[i], b = p[i + h2];
            p[i] = a * cos[i] - b * sin[i];
            p[i + h2] = b * cos[i + h2] + a * sin[i + h2];
        }
    }
}

static inline float dot_bf16(const float *q, const uint16_t *k, int hd) {
    if (hd % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < hd; i += 16) {
            __m512 kv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(k + i))), 16));
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv, acc);
        }
        return _mm512_reduce_add_ps(acc);
    }
    float d = 0;
    for (int i = 0; i < hd; i++) d += q[i] * bf16_to_f32(k[i]);
    return d;
}

static __thread float *t_ws;
static __thread size_t t_ws_cap;

enum { P_ANORM, P_QKV_Q, P_QKV_S, P_QKV_M, P_O_Q, P_O_S, P_O_M, P_MNORM, P_GU_Q, P_GU_S, P_GU_M, P_D_Q, P_D_S, P_D_M, P_N };

/* M sequences, one new token each (continuous batching), through every layer.
 * x (M x D fp32, in/out): the tokens' embeddings in, the last layer's outputs out.
 * ptrs: L * P_N weight addresses (see the enum).
 * kc[j], vc[j]: sequence j's bf16 caches (L, Hk, S[j], hd); pos[j]: its new token's position (< S[j]).
 * cos, sin: M x hd, the rotary factors of each token's position. Returns 0 on success. */
int slmkit_q4_decode_batch(float *x, int M, int L, int D, int H, int Hk, int hd, int F, float eps,
                           const int64_t *ptrs, const int64_t *kc, const int64_t *vc, const int *S, const int *pos,
                           const float *cos, const float *sin) {
    if (D % 64 || (H * hd) % 64 || F % 64 || hd % 2 || H % Hk || M < 1 || F > 65536 || D > 65536 || H * hd > 65536) return -2;
    size_t ctx = 0; /* sum of context lengths after this step */
    for (int j = 0; j < M; j++) {
        if (pos[j] < 0 || pos[j] >= S[j]) return -2;
        ctx += (size_t)pos[j] + 1;
    }
    const int nqkv = (H + 2 * Hk) * hd, group = H / Hk;
    int kmax = D > H * hd ? D : H * hd;
    kmax = kmax > F ? kmax : F;
    if (scratch((size_t)M * kmax)) return -1; /* quantised activations, shared by the team below */
    size_t need = (size_t)M * (2 * (size_t)D + nqkv + (size_t)H * hd + 3 * (size_t)F) + (size_t)H * ctx + (size_t)M;
    if (need > t_ws_cap) {
        free(t_ws);
        t_ws = (float *)malloc(need * sizeof(float));
        t_ws_cap = t_ws ? need : 0;
        if (!t_ws) return -1;
    }
    float *h = t_ws, *qkv = h + (size_t)M * D, *att = qkv + (size_t)M * nqkv, *gu = att + (size_t)M * H * hd,
          *act = gu + (size_t)M * 2 * F, *tmp = act + (size_t)M * F, *sc = tmp + (size_t)M * D;
    int8_t *xq = t_xq;
    float *xs = t_xs, *xsum = t_xsum, *xcorr = t_xcorr;
    size_t sc_off[M]; /* where each sequence's H score rows start */
    for (size_t j = 0, o = 0; j < (size_t)M; j++) { sc_off[j] = o; o += (size_t)H * (pos[j] + 1); }
    const float scale = 1.0f / sqrtf((float)hd);
    /* One team for the whole step: serial parts run in `single` blocks, matmuls and attention are
     * worksharing loops; every construct ends in a barrier, so there is no fork/join per matmul. */
#pragma omp parallel
    for (int l = 0; l < L; l++) {
        const int64_t *p = ptrs + (size_t)l * P_N;
#define PTR(i, T) ((T)(intptr_t)p[i])
#pragma omp single
        {
            for (int j = 0; j < M; j++) rmsnorm(x + (size_t)j * D, PTR(P_ANORM, const uint16_t *), D, eps, h + (size_t)j * D);
            quantize(h, 0, M, D, xq, xs, xsum, xcorr);
        }
        mm_tiles(PTR(P_QKV_Q, const uint8_t *), PTR(P_QKV_S, const uint16_t *), PTR(P_QKV_M, const uint16_t *), D,
                 xq, xs, xsum, xcorr, M, nqkv, qkv, 0);
#pragma omp single
        for (int j = 0; j < M; j++) {
            float *q = qkv + (size_t)j * nqkv, *k = q + (size_t)H * hd, *v = k + (size_t)Hk * hd;
            rope(q, H, hd, cos + (size_t)j * hd, sin + (size_t)j * hd);
            rope(k, Hk, hd, cos + (size_t)j * hd, sin + (size_t)j * hd);
            const size_t Sj = (size_t)S[j];
            uint16_t *kl = (uint16_t *)(intptr_t)kc[j] + (size_t)l * Hk * Sj * hd;
            uint16_t *vl = (uint16_t *)(intptr_t)vc[j] + (size_t)l * Hk * Sj * hd;
            for (int g = 0; g < Hk; g++)
                for (int i = 0; i < hd; i++) {
                    kl[((size_t)g * Sj + pos[j]) * hd + i] = f32_to_bf16(k[g * hd + i]);
                    vl[((size_t)g * Sj + pos[j]) * hd + i] = f32_to_bf16(v[g * hd + i]);
                }
        }
#pragma omp for schedule(dynamic, 1)
        for (int jh = 0; jh < M * H; jh++) {
            const int j = jh / H, hh = jh % H, g = hh / group, n = pos[j] + 1;
            const size_t Sj = (size_t)S[j];
            const uint16_t *kg = (const uint16_t *)(intptr_t)kc[j] + ((size_t)l * Hk + g) * Sj * hd;
            const uint16_t *vg = (const uint16_t *)(intptr_t)vc[j] + ((size_t)l * Hk + g) * Sj * hd;
            const float *qh = qkv + (size_t)j * nqkv + (size_t)hh * hd;
            float *s_ = sc + sc_off[j] + (size_t)hh * n, mx = -INFINITY;
            for (int t = 0; t < n; t++) {
                s_[t] = dot_bf16(qh, kg + (size_t)t * hd, hd) * scale;
                mx = s_[t] > mx ? s_[t] : mx;
            }
            float sum = 0;
            for (int t = 0; t < n; t++) { s_[t] = expf(s_[t] - mx); sum += s_[t]; }
            float *o = att + ((size_t)j * H + hh) * hd;
            for (int i = 0; i < hd; i++) o[i] = 0;
            for (int t = 0; t < n; t++) {
                const float w = s_[t] / sum;
                const uint16_t *vt = vg + (size_t)t * hd;
                for (int i = 0; i < hd; i++) o[i] += w * bf16_to_f32(vt[i]);
            }
        }
#pragma omp single
        quantize(att, 0, M, H * hd, xq, xs, xsum, xcorr);
        mm_tiles(PTR(P_O_Q, const uint8_t *), PTR(P_O_S, const uint16_t *), PTR(P_O_M, const uint16_t *), H * hd,
                 xq, xs, xsum, xcorr, M, D, tmp, 0);
#pragma omp single
        {
            for (size_t i = 0; i < (size_t)M * D; i++) x[i] += tmp[i];
            for (int j = 0; j < M; j++) rmsnorm(x + (size_t)j * D, PTR(P_MNORM, const uint16_t *), D, eps, h + (size_t)j * D);
            quantize(h, 0, M, D, xq, xs, xsum, xcorr);
        }
        mm_tiles(PTR(P_GU_Q, const uint8_t *), PTR(P_GU_S, const uint16_t *), PTR(P_GU_M, const uint16_t *), D,
                 xq, xs, xsum, xcorr, M, 2 * F, gu, 0);
#pragma omp single
        {
            for (int j = 0; j < M; j++)
                for (int i = 0; i < F; i++) {
                    const float g = gu[(size_t)j * 2 * F + i];
                    act[(size_t)j * F + i] = g / (1.0f + expf(-g)) * gu[(size_t)j * 2 * F + F + i];
                }
            quantize(act, 0, M, F, xq, xs, xsum, xcorr);
        }
        mm_tiles(PTR(P_D_Q, const uint8_t *), PTR(P_D_S, const uint16_t *), PTR(P_D_M, const uint16_t *), F,
                 xq, xs, xsum, xcorr, M, D, tmp, 0);
#pragma omp single
        for (size_t i = 0; i < (size_t)M * D; i++) x[i] += tmp[i];
#undef PTR
    }
    return 0;
}

/* ------------------------------------------------------------------ dequantisation for long prompts
 *
 * A prompt of many tokens is compute-bound, not bandwidth-bound: there a bf16 matmul (AMX on CPUs
 * that have it) beats the int8 dot products. This writes the bf16 weight (N x K) the codes stand for.
 */
void slmkit_q4_dequant_bf16(const uint8_t *q, const uint16_t *s, const uint16_t *m, int N, int K, uint16_t *out) {
    const int nb = K / GROUP, nc = K / 64;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        const uint8_t *qr = q + (size_t)r * (K / 2);
        uint16_t *o = out + (size_t)r * K;
        for (int c = 0; c < nc; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(qr + 32 * c));
            __m256i lo = _mm256_and_si256(raw, _mm256_set1_epi8(0x0F));
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0F));
            uint8_t codes[64];
            _mm256_storeu_si256((__m256i *)codes, lo);
            _mm256_storeu_si256((__m256i *)(codes + 32), hi);
            for (int half = 0; half < 2; half++) { /* group 2c + half: 32 codes */
                const int b = 2 * c + half;
                const float sv = _cvtsh_ss(s[(size_t)r * nb + b]), mv = _cvtsh_ss(m[(size_t)r * nb + b]);
                const __m512 vs = _mm512_set1_ps(sv), vm = _mm512_set1_ps(mv - 8.0f * sv);
                for (int j = 0; j < 32; j += 16) {
                    __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * half + j))));
                    w = _mm512_fmadd_ps(w, vs, vm);
                    __m512i u = _mm512_castps_si512(w); /* round to nearest even, keep the top 16 bits */
                    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
                    _mm256_storeu_si256((__m256i *)(o + 64 * c + 32 * half + j), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
                }
            }
        }
    }
}

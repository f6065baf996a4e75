/* slmkit: fp32 matmul for a few activation rows, y (M x N) = x (M x K) W^T, W an fp32 (N x K) row-major matrix.
 *
 * Why: decode-time passes over a handful of tokens (speculative verification of k drafts, a batch of a
 * few sequences) are bandwidth-bound, so the weight should be read from memory once whatever M is.
 * torch's CPU sgemm reads it once for M = 1 and 2 but for M = 3..12 runs at about half that speed
 * on this 2-core AVX-512 machine (a pass over 4 tokens cost 1.7x one token); see docs/benchmarks.md,
 * "Exact self-speculation on the fast path". Here each tile of NB weight rows is loaded once per
 * 16 inputs and multiplied into the MB activation rows it meets (register blocking, as in any
 * GEMM micro-kernel; Goto and van de Geijn 2008, "Anatomy of high-performance matrix multiplication",
 * specialised to tiny M), so the weight streams once and the arithmetic hides behind the load.
 *
 * Numerics: every product y[m][n] is computed the same way whatever M is and whichever variant runs:
 * 16 fp32 multiply-add chains, lane j summing the inputs k = j (mod 16) in order, then a fixed pairwise
 * sum of the 16 lanes. The code is written with GCC's generic vectors (vector_size 64), which the compiler
 * lowers to one zmm register (AVX-512), two ymm (AVX2), four q registers (NEON) or SSE2/scalar code
 * (portable); the library is built with -ffp-contract=fast, so a multiply-add is fused wherever the variant has
 * FMA (the AVX-512 build always: kernels/ggml.c's gg_f32_tile, which writes _mm512_fmadd_ps, relies on it for
 * its bit-for-bit equality with this kernel), and the variants agree to fp32 rounding. Against torch's sgemm the order of additions differs: about 1e-7 relative.
 *
 * Threads: OpenMP over blocks of output rows (the libgomp torch loaded, same thread count).
 */
#include "common.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors in static inline helpers only: no ABI crosses a call */
#endif

typedef float v16 __attribute__((vector_size(64)));

#define F32_NB 4 /* weight rows per tile */
#define F32_MB 4 /* activation rows per tile */
#define F32_ROWS_PER_ITEM 16 /* output columns (weight rows) per OpenMP work item */

static inline v16 v16_load(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The 16 lanes summed pairwise in a fixed order: lanes i and i + 8, then i + 4, i + 2, i + 1 (the order of
 * _mm512_reduce_add_ps, which the AVX-512 build uses; the others halve the vector the same way). */
#if defined(SLMKIT_AVX512)
static inline float v16_sum(v16 v) { return _mm512_reduce_add_ps((__m512)v); }
#else
static inline float v16_sum(v16 v) { /* plain C (GCC < 12 has no __builtin_shufflevector); the same order */
    float t[16];
    memcpy(t, &v, sizeof t);
    for (int i = 0; i < 8; i++) t[i] += t[i + 8];
    for (int i = 0; i < 4; i++) t[i] += t[i + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
}
#endif

/* One tile: the nb weight rows at wt (row stride K; output columns n0..n0+nb) against rows m0..m0+mb of x
 * (nb, mb constant after inlining). */
static inline __attribute__((always_inline)) void f32_tile(const float *x, int m0, int mb, int K, const float *wt, int n0,
                                                          int nb, float *y, int N) {
    v16 acc[F32_NB][F32_MB];
    for (int r = 0; r < nb; r++)
        for (int m = 0; m < mb; m++) acc[r][m] = (v16){0};
    for (int k = 0; k < K; k += 16) {
        v16 wv[F32_NB];
        for (int r = 0; r < nb; r++) wv[r] = v16_load(wt + (size_t)r * K + k);
        for (int m = 0; m < mb; m++) {
            const v16 xv = v16_load(x + (size_t)(m0 + m) * K + k);
            for (int r = 0; r < nb; r++) acc[r][m] += wv[r] * xv;
        }
    }
    for (int r = 0; r < nb; r++)
        for (int m = 0; m < mb; m++) y[(size_t)(m0 + m) * N + n0 + r] = v16_sum(acc[r][m]);
}

#define F32_TILE_MB(NBV)                                                                                               \
    switch (mb) {                                                                                                      \
    case 1: f32_tile(x, m0, 1, K, wt, n0, NBV, y, N); break;                                                            \
    case 2: f32_tile(x, m0, 2, K, wt, n0, NBV, y, N); break;                                                            \
    case 3: f32_tile(x, m0, 3, K, wt, n0, NBV, y, N); break;                                                            \
    default: f32_tile(x, m0, 4, K, wt, n0, NBV, y, N); break;                                                           \
    }

/* Output columns n0..n0+nb (nb <= F32_NB) from their weight rows at wt, against every row of x: the nb rows stay in
 * L1 across the activation tiles. */
static void f32_block(const float *x, int M, int K, const float *wt, int n0, int nb, float *y, int N) {
    for (int m0 = 0; m0 < M; m0 += F32_MB) {
        const int mb = M - m0 < F32_MB ? M - m0 : F32_MB;
        switch (nb) {
        case 1: F32_TILE_MB(1) break;
        case 2: F32_TILE_MB(2) break;
        case 3: F32_TILE_MB(3) break;
        default: F32_TILE_MB(4) break;
        }
    }
}

static void f32_rows(const float *x, int M, int K, const float *w, int r0, int r1, float *y, int N) {
    for (int n0 = r0; n0 < r1; n0 += F32_NB) {
        const int nb = r1 - n0 < F32_NB ? r1 - n0 : F32_NB;
        f32_block(x, M, K, w + (size_t)n0 * K, n0, nb, y, N);
    }
}

/* y (M x N) = x (M x K) @ W^T, all fp32 and row-major. Returns 0, or -2 for a shape it does not take (K % 16). */
int slmkit_f32_matmul(const float *x, int M, int K, const float *w, int N, float *y) {
    if (K % 16 || K <= 0 || M < 0 || N < 0) return -2;
    const int items = (N + F32_ROWS_PER_ITEM - 1) / F32_ROWS_PER_ITEM;
#pragma omp parallel for schedule(static)
    for (int it = 0; it < items; it++) {
        const int r0 = it * F32_ROWS_PER_ITEM, r1 = r0 + F32_ROWS_PER_ITEM < N ? r0 + F32_ROWS_PER_ITEM : N;
        f32_rows(x, M, K, w, r0, r1, y, N);
    }
    return 0;
}

/* y (M x Ntot) = x (M x K) @ [W_0; W_1; ...]^T for nparts (<= 8) GGUF tensors given as raw blocks (part p: Ns[p] rows
 * of slmkit_gg_row_bytes(types[p], K)), side by side in y's columns (a fused q/k/v or gate/up projection in one
 * call). Each tile of F32_NB rows is dequantised exactly as gguf-py does (slmkit_gg_row_exact, into per-thread
 * scratch) and multiplied as above, so y is, bit for bit, slmkit_f32_matmul of the dequantised weights (the same
 * products in the same order) while the weights stream from memory at 4-8 bits a weight instead of 32: the fp32
 * model transformers loads from the file, computed from the file's own codes. On AVX-512, up to 8 activation rows
 * are multiplied straight from the blocks (slmkit_gg_f32_rows: the same products, no copy of the weights). Returns
 * 0, -2 for a type or shape without a kernel, -1 out of memory. */
int slmkit_gg_f32_matmul_parts(int nparts, const int *types, const uint8_t *const *ws, const int *Ns, int K, const float *x, int M,
                               float *y) {
    if (nparts < 1 || nparts > 8 || K % 16 || M < 0) return -2;
    int first[9], rbs[8], col[8], Ntot = 0;
    first[0] = 0;
    for (int p = 0; p < nparts; p++) {
        rbs[p] = slmkit_gg_row_bytes(types[p], K);
        if (rbs[p] < 0 || Ns[p] < 0) return -2;
        col[p] = Ntot;
        Ntot += Ns[p];
        first[p + 1] = first[p] + (Ns[p] + F32_ROWS_PER_ITEM - 1) / F32_ROWS_PER_ITEM;
    }
    const int items = first[nparts];
    int fail = 0;
#pragma omp parallel for schedule(static) reduction(| : fail)
    for (int it = 0; it < items; it++) {
        int p = 0;
        while (it >= first[p + 1]) p++;
        const int type = types[p], rb = rbs[p], N = Ns[p];
        const uint8_t *w = ws[p];
        float *yp = y + col[p];
        /* the rows' group terms (8 K / 16 floats), then room for F32_NB dequantised rows */
        float *buf = (float *)slmkit_scratch(SCR_GF, sizeof(float) * ((size_t)F32_NB * K + (size_t)K / 2));
        if (!buf) {
            fail |= 1;
            continue;
        }
        const int r0 = (it - first[p]) * F32_ROWS_PER_ITEM, r1 = r0 + F32_ROWS_PER_ITEM < N ? r0 + F32_ROWS_PER_ITEM : N;
        if (M <= 2 * F32_MB && slmkit_gg_f32_rows(type, w, rb, K, x, M, r0, r1, yp, Ntot, buf) == 0) continue;
        for (int n0 = r0; n0 < r1; n0 += F32_NB) {
            const int nb = r1 - n0 < F32_NB ? r1 - n0 : F32_NB;
            slmkit_prefetch_ahead(w + (size_t)n0 * rb, (size_t)F32_NB * rb); /* the thread's rows are contiguous */
            for (int r = 0; r < nb; r++) slmkit_gg_row_exact(type, w + (size_t)(n0 + r) * rb, K, buf + (size_t)r * K);
            f32_block(x, M, K, buf, n0, nb, yp, Ntot);
        }
    }
    return fail ? -1 : 0;
}

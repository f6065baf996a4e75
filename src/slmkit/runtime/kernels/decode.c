/* slmkit: one fused llama decode step over slmkit-q4 or GGUF-format weights (one C call per token).
 *
 * One token of each of M sequences through every layer without returning to Python: RMSNorm,
 * q/k/v projection, RoPE (rotate-half form, as transformers), the new k/v written to a bf16 cache
 * of layout (L, Hk, S, hd), grouped-query attention over positions 0..pos, output projection,
 * residual, RMSNorm, gate/up projection, SiLU(gate) * up, down projection, residual. The residual
 * stream and every intermediate stay fp32. Each input is quantised to int8 once
 * (slmkit_q4_quantize) and every matrix reading it multiplies with its own kernel: slmkit's q4
 * layout (q4.c) or a GGUF block format (ggml.c), so a GGUF file's mixed per-tensor types
 * (Q4_K_M: Q5_0, Q8_0, Q4_K and Q6_K in one model) run in one call.
 * slmkit_decode_batch_arch adds what other families compute (slmkit.runtime.arch.ArchSpec): per-head q/k
 * norms, norms on each block's output, sliding windows, per-layer rotary tables, a query scale, an
 * attention soft-cap and GELU-tanh; norm weights come in as the effective scale (Gemma's 1 + w).
 */
#include "common.h"

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

/* The table layout: the source of truth for slmkit/runtime/decodelayout.py, which mirrors every name below;
 * slmkit_decode_layout lists them and the loader compares (tests/runtime/test_decode_layout.py parses this file).
 * Python (slmkit.runtime.fusedstep) fills the tables; change both sides together.
 *
 * layers: int64, L * L_N values, one row per layer:
 *   L_ANORM, L_MNORM        addresses of the attention-input and MLP-input RMSNorm weights (bf16, D values, the
 *                           effective scale: Gemma's 1 + w); never 0.
 *   L_SEGS + s * SEG_N      matrix slot s (S_Q .. S_DOWN), SEG_N values each. S_Q, S_K, S_V read the attention
 *                           input and write q|k|v side by side (slmkit's q4 path has one fused q|k|v matrix in S_Q
 *                           and empty S_K, S_V); S_O the output projection; S_GATE, S_UP gate|up (one fused
 *                           matrix may fill S_GATE); S_DOWN the down projection.
 * A matrix descriptor (also `head`, the optional output head), SEG_N int64 values:
 *   SEG_KIND   KIND_EMPTY (slot unused, every other value 0), KIND_Q4 (slmkit's 4-bit layout, q4.c) or
 *              KIND_GGUF (llama.cpp blocks, ggml.c).
 *   SEG_TYPE   GGUF: the ggml type id of the blocks; q4: 0.
 *   SEG_ROWS   output rows (the slots reading one input add up to its output width).
 *   SEG_P0     address of the codes (q4: uint8 rows x K/2; GGUF: the rows' block bytes).
 *   SEG_P1     q4: address of the fp16 scales (rows x K/32); GGUF: 0.
 *   SEG_P2     q4: address of the fp16 centres (rows x K/32); GGUF: 0. */
enum { L_ANORM, L_MNORM, L_SEGS };
enum { SEG_KIND, SEG_TYPE, SEG_ROWS, SEG_P0, SEG_P1, SEG_P2, SEG_N };
enum { S_Q, S_K, S_V, S_O, S_GATE, S_UP, S_DOWN, S_N };
enum { KIND_EMPTY, KIND_Q4, KIND_GGUF };
#define L_N (L_SEGS + S_N * SEG_N)

typedef struct {
    int8_t *xq;
    float *xs, *xsum, *xcorr, *xc32, *xc16, *xs16;
} acts;

/* Quantise M rows of x (K inputs) once for every matrix that reads them; the GGUF extras only when one does. */
static void quantize_for(const float *x, int M, int K, int gg, const acts *a) {
    slmkit_q4_quantize(x, 0, M, K, a->xq, a->xs, a->xsum, a->xcorr);
    if (gg) slmkit_gg_prepare(a->xq, a->xs, M, K, a->xc32, a->xc16, a->xs16);
}

/* y (M x ldy) columns of the matrices sg[0..n) side by side: tiles of 8 rows split across the team in contiguous
 * shares (one kernel call per thread and matrix: the q4 kernel transposes the activations once per call), then a barrier. */
static void mm_segs(const int64_t *sg, int n, int K, const acts *a, int M, float *y, int ldy) {
    const int tile = 8;
    int first[S_N + 1] = {0}, col[S_N] = {0};
    first[0] = 0;
    for (int s = 0, c = 0; s < n; s++) {
        const int rows = (int)sg[s * SEG_N + SEG_ROWS];
        col[s] = c;
        c += rows;
        first[s + 1] = first[s] + (rows + tile - 1) / tile;
    }
    const slmkit_gg_act ga = {a->xq, a->xs, a->xsum, a->xc32, a->xc16, a->xs16};
    int lo, hi;
    slmkit_share(first[n], &lo, &hi);
    for (int s = 0; s < n; s++) {
        const int t0 = lo > first[s] ? lo : first[s], t1 = hi < first[s + 1] ? hi : first[s + 1];
        if (t0 >= t1) continue;
        const int64_t *d = sg + s * SEG_N;
        const int rows = (int)d[SEG_ROWS], r0 = (t0 - first[s]) * tile, r1 = (t1 - first[s]) * tile < rows ? (t1 - first[s]) * tile : rows;
        if (d[SEG_KIND] == KIND_Q4)
            slmkit_q4_rows((const uint8_t *)(intptr_t)d[SEG_P0], (const uint16_t *)(intptr_t)d[SEG_P1],
                           (const uint16_t *)(intptr_t)d[SEG_P2], K, a->xq, a->xs, a->xsum, a->xcorr, M, r0, r1,
                           y + col[s], ldy, 0);
        else
            slmkit_gg_rows((int)d[SEG_TYPE], (const uint8_t *)(intptr_t)d[SEG_P0], K, &ga, M, r0, r1, y + col[s], ldy, 0);
    }
#pragma omp barrier
}

/* Whether the matrices are well formed for K inputs and add up to `rows` outputs; whether one is GGUF. */
static int check_segs(const int64_t *sg, int n, int K, int rows, int *gg) {
    int total = 0;
    for (int s = 0; s < n; s++) {
        const int64_t *d = sg + s * SEG_N;
        if (d[SEG_KIND] == KIND_EMPTY) {
            if (d[SEG_ROWS]) return 0;
            continue;
        }
        if (d[SEG_ROWS] <= 0 || !d[SEG_P0]) return 0;
        if (d[SEG_KIND] == KIND_Q4) {
            if (K % 64 || !d[SEG_P1] || !d[SEG_P2]) return 0;
        } else if (d[SEG_KIND] == KIND_GGUF) {
            if (slmkit_gg_row_bytes((int)d[SEG_TYPE], K) < 0) return 0;
            *gg = 1;
        } else {
            return 0;
        }
        total += (int)d[SEG_ROWS];
    }
    return total == rows;
}

/* Architecture extras (slmkit.runtime.arch.ArchSpec), 0 where absent.
 * ext: int64, L * X_N values, one row per layer:
 *   X_QNORM, X_KNORM     addresses of the per-head q and k RMSNorm weights applied before RoPE (bf16, hd values;
 *                        both or neither: Qwen3, Gemma 3).
 *   X_PANORM, X_PMNORM   addresses of the norms on the attention and MLP outputs before their residuals (bf16, D
 *                        values: Gemma 2/3).
 *   X_WINDOW             sliding window in tokens (keys at positions > pos - window); 0: full attention.
 *   X_ROPE               which rotary table the layer reads, 0 <= X_ROPE < fp[F_NROPE] (Gemma 3: local and global).
 *   X_QKVBIAS            address of the fp32 q|k|v bias ((H + 2 Hk) hd values, Qwen2).
 * fp: float32, F_N model-wide values:
 *   F_SCALE     query scale (0: 1/sqrt(hd)).
 *   F_SOFTCAP   attention soft-cap c in c*tanh(s/c) (0: none, Gemma 2).
 *   F_ACT       GLU activation: 0 SiLU, 1 GELU tanh approximation (Gemma).
 *   F_NROPE     rotary tables per token (>= 1). */
enum { X_QNORM, X_KNORM, X_PANORM, X_PMNORM, X_WINDOW, X_ROPE, X_QKVBIAS, X_N };
enum { F_SCALE, F_SOFTCAP, F_ACT, F_NROPE, F_N };

/* Entry i of the layout above: its name and value; 0 past the last (slmkit.runtime.decodelayout.from_library). */
int slmkit_decode_layout(int i, const char **name, int64_t *value) {
#define E(n) {#n, n}
    static const struct { const char *name; int64_t value; } t[] = {
        E(L_ANORM), E(L_MNORM), E(L_SEGS), E(L_N),
        E(SEG_KIND), E(SEG_TYPE), E(SEG_ROWS), E(SEG_P0), E(SEG_P1), E(SEG_P2), E(SEG_N),
        E(S_Q), E(S_K), E(S_V), E(S_O), E(S_GATE), E(S_UP), E(S_DOWN), E(S_N),
        E(KIND_EMPTY), E(KIND_Q4), E(KIND_GGUF),
        E(X_QNORM), E(X_KNORM), E(X_PANORM), E(X_PMNORM), E(X_WINDOW), E(X_ROPE), E(X_QKVBIAS), E(X_N),
        E(F_SCALE), E(F_SOFTCAP), E(F_ACT), E(F_NROPE), E(F_N),
    };
#undef E
    if (i < 0 || i >= (int)(sizeof t / sizeof t[0])) return 0;
    *name = t[i].name;
    *value = t[i].value;
    return 1;
}

static inline float gelu_tanh(float g) { /* transformers' gelu_pytorch_tanh */
    return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

/* x (M x D) = its RMSNorm with bf16 weights w, row by row, in place (rmsnorm reads a row before writing it). */
static void norm_rows(float *x, int M, int D, const int64_t w, float eps) {
    for (int j = 0; j < M; j++) rmsnorm(x + (size_t)j * D, (const uint16_t *)(intptr_t)w, D, eps, x + (size_t)j * D);
}

/* M sequences, one new token each (continuous batching), through every layer.
 * x (M x D fp32, in/out): the tokens' embeddings in, the last layer's outputs out.
 * layers: L * L_N values (see the enums above).
 * kc[j], vc[j]: sequence j's bf16 caches (L, Hk, S[j], hd); pos[j]: its new token's position (< S[j]).
 * cos, sin: M x hd, the rotary factors of each token's position.
 * head (optional, with norm and logits): one matrix descriptor (SEG_KIND .. SEG_P2) of the output head;
 * then the last layer's outputs go through the final RMSNorm (bf16 weights `norm`) and the head into
 * logits (M x rows, fp32) in the same call.
 * ext (optional): L * X_N architecture extras, fp: F_N model-wide ones (see above); with F_NROPE = R > 1,
 * cos and sin are M x R x hd (table r of token j at (j R + r) hd).
 * Returns 0 on success, -2 for bad sizes or positions, -3 for a malformed descriptor, -1 out of memory. */
int slmkit_decode_batch_arch(float *x, int M, int L, int D, int H, int Hk, int hd, int F, float eps,
                             const int64_t *layers, const int64_t *kc, const int64_t *vc, const int *S, const int *pos,
                             const float *cos, const float *sin, const uint16_t *norm, const int64_t *head, float *logits,
                             const int64_t *ext, const float *fp) {
    if (D % 64 || (H * hd) % 64 || F % 64 || hd % 2 || H % Hk || M < 1 || F > SLMKIT_MAX_K || D > SLMKIT_MAX_K || H * hd > SLMKIT_MAX_K) return -2;
    size_t ctx = 0; /* sum of context lengths after this step */
    for (int j = 0; j < M; j++) {
        if (pos[j] < 0 || pos[j] >= S[j]) return -2;
        ctx += (size_t)pos[j] + 1;
    }
    const int nqkv = (H + 2 * Hk) * hd, group = H / Hk;
    int gg_attn = 0, gg_o = 0, gg_gu = 0, gg_down = 0; /* which inputs GGUF matrices read */
    for (int l = 0; l < L; l++) {
        const int64_t *sg = layers + (size_t)l * L_N + L_SEGS;
        if (!layers[(size_t)l * L_N + L_ANORM] || !layers[(size_t)l * L_N + L_MNORM] ||
            !check_segs(sg + S_Q * SEG_N, 3, D, nqkv, &gg_attn) || !check_segs(sg + S_O * SEG_N, 1, H * hd, D, &gg_o) ||
            !check_segs(sg + S_GATE * SEG_N, 2, D, 2 * F, &gg_gu) || !check_segs(sg + S_DOWN * SEG_N, 1, F, D, &gg_down))
            return -3;
    }
    const int nrope = fp && fp[F_NROPE] >= 1 ? (int)fp[F_NROPE] : 1, gelu = fp && fp[F_ACT] == 1.0f;
    const float softcap = fp ? fp[F_SOFTCAP] : 0.0f;
    if (ext)
        for (int l = 0; l < L; l++)
            if (ext[(size_t)l * X_N + X_WINDOW] < 0 || ext[(size_t)l * X_N + X_ROPE] < 0 || ext[(size_t)l * X_N + X_ROPE] >= nrope ||
                !ext[(size_t)l * X_N + X_QNORM] != !ext[(size_t)l * X_N + X_KNORM])
                return -3;
    int gg_head = 0;
    const int V = head ? (int)head[SEG_ROWS] : 0;
    if (head && (!norm || !logits || !check_segs(head, 1, D, V, &gg_head))) return -3;
    int kmax = D > H * hd ? D : H * hd;
    kmax = kmax > F ? kmax : F;
    const size_t mk = (size_t)M * kmax;
    const size_t ws = (size_t)M * (2 * (size_t)D + nqkv + (size_t)H * hd + 3 * (size_t)F) + (size_t)H * ctx + (size_t)M;
    const size_t mb = mk / GROUP;
    /* scratch: the activations' codes and scales, the work space, and where each sequence's H score
     * rows start (on the heap: M is the batch size, unbounded; a stack array of M overflowed) */
    const size_t need[9] = {mk, 4 * mb, 4 * mb, 4 * mb, 4 * mb, 8 * mb, 8 * mb, 4 * ws, sizeof(size_t) * (size_t)M};
    void *buf[9];
    for (int i = 0; i < 9; i++)
        if (!(buf[i] = slmkit_scratch(SCR_DEC + i, need[i]))) return -1;
    const acts a = {(int8_t *)buf[0], (float *)buf[1], (float *)buf[2], (float *)buf[3],
                    (float *)buf[4], (float *)buf[5], (float *)buf[6]};
    float *h = (float *)buf[7], *qkv = h + (size_t)M * D, *att = qkv + (size_t)M * nqkv, *gu = att + (size_t)M * H * hd,
          *act = gu + (size_t)M * 2 * F, *tmp = act + (size_t)M * F, *sc = tmp + (size_t)M * D;
    size_t *sc_off = (size_t *)buf[8];
    for (size_t j = 0, o = 0; j < (size_t)M; j++) { sc_off[j] = o; o += (size_t)H * (pos[j] + 1); }
    const float scale = fp && fp[F_SCALE] > 0 ? fp[F_SCALE] : 1.0f / sqrtf((float)hd);
    const int head_quant = hd % GROUP == 0; /* each head's attention output quantised by the thread that computed it */
    /* One team for the whole step: serial parts run in `single` blocks, matmuls and attention are
     * worksharing loops; every construct ends in a barrier, so there is no fork/join per matmul. */
#pragma omp parallel
    {
        for (int l = 0; l < L; l++) {
            const int64_t *p = layers + (size_t)l * L_N, *sg = p + L_SEGS;
            static const int64_t none[X_N] = {0};
            const int64_t *xl = ext ? ext + (size_t)l * X_N : none, *xp = ext && l > 0 ? ext + (size_t)(l - 1) * X_N : none;
            const int win = (int)xl[X_WINDOW], rt = (int)xl[X_ROPE];
#pragma omp single
            {
                if (l > 0) { /* the previous layer's down projection (normalised: Gemma) joins the residual stream */
                    if (xp[X_PMNORM]) norm_rows(tmp, M, D, xp[X_PMNORM], eps);
                    for (size_t i = 0; i < (size_t)M * D; i++) x[i] += tmp[i];
                }
                for (int j = 0; j < M; j++) rmsnorm(x + (size_t)j * D, (const uint16_t *)(intptr_t)p[L_ANORM], D, eps, h + (size_t)j * D);
                quantize_for(h, M, D, gg_attn, &a);
            }
            mm_segs(sg + S_Q * SEG_N, 3, D, &a, M, qkv, nqkv);
#pragma omp single
            for (int j = 0; j < M; j++) {
                float *q = qkv + (size_t)j * nqkv, *k = q + (size_t)H * hd, *v = k + (size_t)Hk * hd;
                if (xl[X_QKVBIAS]) {
                    const float *b = (const float *)(intptr_t)xl[X_QKVBIAS];
                    for (int i = 0; i < nqkv; i++) q[i] += b[i];
                }
                if (xl[X_QNORM]) { /* per-head RMSNorm of q and k before RoPE */
                    norm_rows(q, H, hd, xl[X_QNORM], eps);
                    norm_rows(k, Hk, hd, xl[X_KNORM], eps);
                }
                const size_t ro = ((size_t)j * nrope + rt) * hd;
                rope(q, H, hd, cos + ro, sin + ro);
                rope(k, Hk, hd, cos + ro, sin + ro);
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
                const int t0 = win > 0 && n > win ? n - win : 0, nw = n - t0; /* a sliding layer reads its window only */
                float *s_ = sc + sc_off[j] + (size_t)hh * n, mx = -INFINITY;
                for (int t = 0; t < nw; t++) {
                    s_[t] = dot_bf16(qh, kg + (size_t)(t0 + t) * hd, hd) * scale;
                    if (softcap > 0) s_[t] = tanhf(s_[t] / softcap) * softcap;
                    mx = s_[t] > mx ? s_[t] : mx;
                }
                float sum = 0;
                for (int t = 0; t < nw; t++) { s_[t] = expf(s_[t] - mx); sum += s_[t]; }
                for (int t = 0; t < nw; t++) s_[t] = s_[t] / sum;
                const size_t off = ((size_t)j * H + hh) * hd;
                weighted_sum_bf16(att + off, s_, vg + (size_t)t0 * hd, nw, hd);
                if (head_quant) { /* groups of 32 never straddle heads: quantise this head's slice here */
                    const acts ah = {a.xq + off, a.xs + off / GROUP, a.xsum + off / GROUP, a.xcorr + off / GROUP,
                                     a.xc32 + off / GROUP, a.xc16 + off / 16, a.xs16 + off / 16};
                    quantize_for(att + off, 1, hd, gg_o, &ah);
                }
            }
            if (!head_quant) {
#pragma omp single
                quantize_for(att, M, H * hd, gg_o, &a);
            }
            mm_segs(sg + S_O * SEG_N, 1, H * hd, &a, M, tmp, D);
#pragma omp single
            {
                if (xl[X_PANORM]) norm_rows(tmp, M, D, xl[X_PANORM], eps);
                for (size_t i = 0; i < (size_t)M * D; i++) x[i] += tmp[i];
                for (int j = 0; j < M; j++) rmsnorm(x + (size_t)j * D, (const uint16_t *)(intptr_t)p[L_MNORM], D, eps, h + (size_t)j * D);
                quantize_for(h, M, D, gg_gu, &a);
            }
            mm_segs(sg + S_GATE * SEG_N, 2, D, &a, M, gu, 2 * F);
            /* act(gate) * up (SiLU or GELU-tanh) and its quantisation, split across the team by groups of 32 (F % 64 == 0) */
#pragma omp for schedule(static)
            for (int jg = 0; jg < M * (F / GROUP); jg++) {
                const int j = jg / (F / GROUP);
                const size_t i0 = (size_t)(jg % (F / GROUP)) * GROUP, off = (size_t)j * F + i0;
                for (size_t i = i0; i < i0 + GROUP; i++) {
                    const float g = gu[(size_t)j * 2 * F + i];
                    act[(size_t)j * F + i] = (gelu ? gelu_tanh(g) : g / (1.0f + expf(-g))) * gu[(size_t)j * 2 * F + F + i];
                }
                const acts ag = {a.xq + off, a.xs + off / GROUP, a.xsum + off / GROUP, a.xcorr + off / GROUP,
                                 a.xc32 + off / GROUP, a.xc16 + off / 16, a.xs16 + off / 16};
                quantize_for(act + off, 1, GROUP, gg_down, &ag);
            }
            mm_segs(sg + S_DOWN * SEG_N, 1, F, &a, M, tmp, D);
        }
#pragma omp single
        {
            const int64_t last = ext ? ext[(size_t)(L - 1) * X_N + X_PMNORM] : 0;
            if (last) norm_rows(tmp, M, D, last, eps);
            for (size_t i = 0; i < (size_t)M * D; i++) x[i] += tmp[i]; /* the last layer's down projection */
            if (head) {
                for (int j = 0; j < M; j++) rmsnorm(x + (size_t)j * D, norm, D, eps, h + (size_t)j * D);
                quantize_for(h, M, D, gg_head, &a);
            }
        }
        if (head) mm_segs(head, 1, D, &a, M, logits, V);
    }
    return 0;
}


/* The llama step (no architecture extras): slmkit_decode_batch_arch with ext and fp NULL. */
int slmkit_decode_batch(float *x, int M, int L, int D, int H, int Hk, int hd, int F, float eps,
                        const int64_t *layers, const int64_t *kc, const int64_t *vc, const int *S, const int *pos,
                        const float *cos, const float *sin, const uint16_t *norm, const int64_t *head, float *logits) {
    return slmkit_decode_batch_arch(x, M, L, D, H, Hk, hd, F, eps, layers, kc, vc, S, pos, cos, sin, norm, head, logits, NULL, NULL);
}

/* A stand-alone run of slmkit's kernel library, for variants Python cannot load here (the NEON build under
 * qemu-aarch64): deterministic weights and activations, every matmul printed as hex floats, one per line.
 * Linked with kernels/q4.c, ggml.c and decode.c by tests/runtime/test_runtime_kernel_variants.py, which
 * compares the lines of two builds. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int slmkit_q4_matmul(const void *x, int x_bf16, int M, int K, const uint8_t *q, const uint16_t *s, const uint16_t *m, int N,
                     void *y, int y_bf16);
int slmkit_gg_matmul(const void *x, int x_bf16, int M, int K, int type, const uint8_t *w, int N, void *y, int y_bf16);
int slmkit_gg_row_bytes(int type, int K);
const char *slmkit_kernel_isa(void);

static uint32_t state = 12345u;
static uint32_t next(void) { return state = state * 1664525u + 1013904223u; }
static uint16_t small_half(void) { return (uint16_t)(0x1c00u + (next() >> 22)); } /* 2^-8 .. 2^-7 */

static void put_half(uint8_t *p, uint16_t h) { p[0] = (uint8_t)h, p[1] = (uint8_t)(h >> 8); }

enum { M = 3, K = 512, N = 24 };

int main(void) {
    static float x[M * K], y[M * N];
    static uint8_t w[N * K * 2];
    static uint16_t s[N * K / 32], m[N * K / 32];
    for (int i = 0; i < M * K; i++) x[i] = (float)((int)(next() >> 16) - 32768) / 16384.0f;
    for (int i = 0; i < N * K / 2; i++) w[i] = (uint8_t)(next() >> 24);
    for (int i = 0; i < N * K / 32; i++) s[i] = small_half(), m[i] = (uint16_t)(small_half() | 0x8000u);
    if (slmkit_q4_matmul(x, 0, M, K, w, s, m, N, y, 0)) return 1;
    for (int i = 0; i < M * N; i++) printf("q4 %a\n", y[i]);
    const int types[] = {2, 3, 6, 7, 8, 12, 13, 14};
    for (int t = 0; t < 8; t++) {
        const int type = types[t], rb = slmkit_gg_row_bytes(type, K), bs = type >= 12 ? 256 : 32;
        const int nbytes = rb / (K / bs);
        for (int i = 0; i < N * rb; i++) w[i] = (uint8_t)(next() >> 24);
        for (int b = 0; b < N * (K / bs); b++) { /* finite small scales where each format keeps them */
            uint8_t *blk = w + (size_t)b * nbytes;
            if (type == 14) {
                put_half(blk + 208, small_half());
            } else {
                put_half(blk, small_half());
                if (type == 3 || type == 7 || type >= 12) put_half(blk + 2, small_half());
            }
        }
        if (slmkit_gg_matmul(x, 0, M, K, type, w, N, y, 0)) return 2;
        for (int i = 0; i < M * N; i++) printf("gg%d %a\n", type, y[i]);
    }
    fprintf(stderr, "%s\n", slmkit_kernel_isa());
    return 0;
}

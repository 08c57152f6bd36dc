/* One batch-1 decoding step of a GPT-2 model on CPU: see gptlab/generation/kernel.py.
 *
 * Decoding one token reads every weight once, so it runs at the speed the cores stream the weights.
 * The weights of each product are repacked (by kernel.py) in blocks of RB output rows,
 * column by column: P[block][in][RB]. The inner loop then reads memory strictly in order and
 * multiplies each loaded line by one broadcast input value: one load per cache line of weights.
 * (Row-major rows need a second load of the input per line; on the development CPU the cores then
 * stream ~15% slower, because in-flight loads, not DRAM, are the limit.)
 *
 * Built by kernel.py with the machine's C compiler (-O3 -march=native -fopenmp), once per
 * weight type: float32 (WT = float) or bfloat16 (-DWEIGHTS_BF16, WT = uint16_t). Activations are
 * float32 throughout, except that a bfloat16 product rounds its input vector to bfloat16 (as the
 * eager bfloat16 model's Linear layers see it), so CPUs with AVX512-BF16 can multiply in one
 * instruction per line and others get the same numbers. The KV cache has the weights' type.
 * Vectors have the target's register width (VL below): 16 floats with AVX-512, 8 with AVX2.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(WEIGHTS_BF16) && defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define RB 64  /* output rows per packed block (decode_kernel.ROWS_PER_BLOCK): the same on every target */

/* Vectors of the target's register width, VL floats. GCC's generic vectors wider than the target's
 * registers are not split into register pairs: in an AVX2 build (-march=x86-64-v3) 64-byte vectors
 * lived on the stack, every multiply-add wrapped in stores and reloads and every broadcast built from
 * 16 scalar stores (237 instructions per two columns of a block, 182 of them on the stack, where the
 * AVX-512 build needs 12), and the kernel read its weights at ~0.37 of the bandwidth bound. NREGS is
 * the number of vector registers, which sizes the sets of accumulators below. */
#if defined(__AVX512F__)
#define VL 16
#define NREGS 32
#elif defined(__AVX__)
#define VL 8
#define NREGS 16
#elif defined(__aarch64__)
#define VL 4
#define NREGS 32
#else
#define VL 4
#define NREGS 16
#endif
#define NV (RB / VL)  /* vectors per row of a block: 4 with AVX-512, 8 with AVX2 */

typedef float vf __attribute__((vector_size(4 * VL)));
typedef float vfu __attribute__((vector_size(4 * VL), aligned(4)));  /* unaligned loads and stores */
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef uint32_t vuu __attribute__((vector_size(4 * VL), aligned(4)));
typedef uint16_t vh __attribute__((vector_size(2 * VL), aligned(2)));

/* Several tokens (a prompt) use each loaded line of weights for up to GROUP of them, so the weights
 * are read from memory once per block and the rest of the passes come from the core's caches. The
 * GROUP x (rows / VL) accumulators, the loaded weights and a broadcast input must fit the registers,
 * or every column spills the accumulators: so a block is done in passes of PR rows (all 64 with
 * AVX-512; 16 with AVX2, whose 16 registers hold 4 x 2 accumulators). The passes of a block read
 * disjoint cache lines (a line is 16 rows of one column), so each line is still fetched once. */
#ifndef GROUP
#define GROUP 4
#endif
#define FITS(rows) (GROUP * ((rows) / VL) + (rows) / VL + 4 <= NREGS)
#if FITS(RB)
#define PR RB
#elif FITS(RB / 2)
#define PR (RB / 2)
#elif FITS(RB / 4)
#define PR (RB / 4)
#else
#define PR (RB / 8)
#endif
#define NP (PR / VL)  /* vectors per row of a pass */

/* One token (decoding): SETS independent sums per row vector, over alternate columns, so the next
 * multiply-add need not wait for the last. Two sets need 2 x NV registers: 8 with AVX-512; with
 * AVX2 one set already takes 8 of the 16 and a second would spill, and 8 independent chains are
 * plenty for a loop that waits on memory. */
#define SETS (2 * NV + 2 <= NREGS ? 2 : 1)

/* ... and, without AVX-512, a software prefetch of every line PREFETCH_AHEAD bytes ahead into L2
 * (prefetcht1). Measured on the development VM (2 cores, 2 MiB pages, products alone against torch's
 * sum() over as many bytes, medians of 15-20 pairs): the AVX2 build read 0.95 without it and
 * 1.09-1.12 with it at 1-2 KiB ahead (4 KiB: 1.03; prefetchnta: 0.51); the AVX-512 build read 1.03-1.05
 * without and 0.94-0.98 with it, so there it stays off. -DPREFETCH_AHEAD=0 turns it off, another
 * value moves it (a CPU whose hardware prefetchers differ may want another distance). */
#ifndef PREFETCH_AHEAD
#ifdef __AVX512F__
#define PREFETCH_AHEAD 0
#else
#define PREFETCH_AHEAD 2048
#endif
#endif
static inline void prefetch_column(const void* p) {
#if PREFETCH_AHEAD > 0
    for (int line = 0; line < RB * 4; line += 64) __builtin_prefetch((const char*)p + PREFETCH_AHEAD + line, 0, 2);
#else
    (void)p;
#endif
}

#ifdef WEIGHTS_BF16
typedef uint16_t WT;
static inline float wt_to_f(WT w) { uint32_t u = (uint32_t)w << 16; float f; memcpy(&f, &u, 4); return f; }
static inline WT f_to_wt(float f) {  /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (WT)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (WT)(u >> 16);
}
static inline vf loadv(const WT* p) { return (vf)(__builtin_convertvector(*(const vh*)p, vu) << 16); }
#define SUFFIX(name) name##_bf16
#else
typedef float WT;
static inline float wt_to_f(WT w) { return w; }
static inline WT f_to_wt(float f) { return f; }
static inline vf loadv(const WT* p) { return *(const vfu*)p; }
#define SUFFIX(name) name##_f32
#endif

/* Pointers of one layer, in the order kernel.py fills them. Vectors are float32. */
typedef struct {
    const float *ln1_w, *ln1_b, *qkv_b, *out_b, *ln2_w, *ln2_b, *fc_b, *proj_b;
    const WT *qkv, *out, *fc, *proj;   /* packed weights */
} Layer;

typedef struct {
    int n_layers, emb, n_heads, head_dim, hidden, vocab_rows, n_threads, max_tokens;
    float eps;
    const WT *tok_emb, *pos_emb;      /* the model's own (rows, emb) tables */
    const float *lnf_w, *lnf_b;
    const WT *head;                   /* packed LM head */
    const Layer* layers;
    float *x, *qkv, *att, *h;           /* shared work buffers: max_tokens rows of the padded widths */
    float* logits;                      /* the padded vocabulary */
    float* scratch;                     /* per thread: max_tokens * (emb + hidden) + max_len floats */
} Model;

/* Products over block b of a packed (rows, cols) weight, for T input vectors: y[t * ys + r] = (W x_t)[r]. */
#ifdef WEIGHTS_BF16
/* bfloat16 blocks hold column pairs, P[block][cols / 2][RB][2]: a 32-bit lane is one row's weights
 * for columns c and c + 1, and the input is given as the matching bfloat16 pairs (cols even). */
typedef uint32_t XT;  /* what a product reads per column pair: two bfloat16 inputs */

#ifdef __AVX512BF16__
/* one instruction per line and token: 16 rows x 2 columns multiplied and summed into float32 (VL is 16) */
#define PRODUCT_BODY(NT)                                                                      \
    __m512 a[NT][NV];                                                                        \
    for (int t = 0; t < NT; t++)                                                             \
        for (int j = 0; j < NV; j++) a[t][j] = _mm512_setzero_ps();                          \
    for (long c = 0; c < cols / 2; c++, p += RB) {                                           \
        __m512i w[NV];                                                                       \
        for (int j = 0; j < NV; j++) w[j] = _mm512_loadu_si512(p + 16 * j);                  \
        for (int t = 0; t < NT; t++) {                                                       \
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[t * xs + c]);                  \
            for (int j = 0; j < NV; j++) a[t][j] = _mm512_dpbf16_ps(a[t][j], (__m512bh)w[j], xb); \
        }                                                                                    \
    }                                                                                        \
    for (int t = 0; t < NT; t++) memcpy(y + t * ys + b * RB, a[t], sizeof a[t]);
#define PRODUCT_ONE PRODUCT_BODY(1)
#else
/* Each 32-bit lane widened twice: its low half is column c's weight, its high half column c + 1's.
 * Rows [r0, r0 + ROWS) of the block in each pass (see PR). */
#define PRODUCT_PASSES(NT, ROWS)                                                              \
    for (int r0 = 0; r0 < RB; r0 += (ROWS)) {                                                \
        vf a[NT][(ROWS) / VL];                                                               \
        memset(a, 0, sizeof a);                                                              \
        const uint32_t* q = p + r0;                                                          \
        for (long c = 0; c < cols / 2; c++, q += RB) {                                       \
            if ((NT) == 1 && (ROWS) == RB) prefetch_column(q);  /* one token: streaming */   \
            vu w[(ROWS) / VL];                                                               \
            for (int j = 0; j < (ROWS) / VL; j++) w[j] = *(const vuu*)(q + VL * j);          \
            for (int t = 0; t < NT; t++) {                                                   \
                uint32_t lo = x[t * xs + c] << 16, hi = x[t * xs + c] & 0xffff0000u;         \
                float x0, x1;                                                                \
                memcpy(&x0, &lo, 4);                                                         \
                memcpy(&x1, &hi, 4);                                                         \
                for (int j = 0; j < (ROWS) / VL; j++)                                        \
                    a[t][j] += (vf)(w[j] << 16) * x0 + (vf)(w[j] & 0xffff0000u) * x1;        \
            }                                                                                \
        }                                                                                    \
        for (int t = 0; t < NT; t++) memcpy(y + t * ys + b * RB + r0, a[t], sizeof a[t]);   \
    }
#define PRODUCT_BODY(NT) PRODUCT_PASSES(NT, PR)
/* one token: the whole block in one pass, in address order, where NV accumulators, a loaded vector,
 * the two broadcast inputs and the widened halves fit the registers (AVX2: 8 + 5 of 16) */
#define PRODUCT_ONE PRODUCT_PASSES(1, (NV + 5 <= NREGS ? RB : PR))
#endif
#define BLOCK_PTR(b) ((const uint32_t*)(P + (b) * cols * RB))

/* The inputs as bfloat16 pairs, the second operand of the bfloat16 product: T rows of cols / 2. */
static const XT* product_input(const float* x, long xs, int T, long cols, uint32_t* xp) {
    for (int t = 0; t < T; t++)
        for (long c = 0; c < cols / 2; c++)
            xp[t * (cols / 2) + c] = (uint32_t)f_to_wt(x[t * xs + 2 * c]) | (uint32_t)f_to_wt(x[t * xs + 2 * c + 1]) << 16;
    return xp;
}
#define INPUT_STRIDE(xs, cols) ((cols) / 2)
#else
typedef float XT;
/* Rows [r0, r0 + PR) of the block in each pass, every loaded line used for NT tokens. */
#define PRODUCT_BODY(NT)                                                                      \
    for (int r0 = 0; r0 < RB; r0 += PR) {                                                    \
        vf a[NT][NP];                                                                        \
        memset(a, 0, sizeof a);                                                              \
        const float* q = p + r0;                                                             \
        for (long c = 0; c < cols; c++, q += RB) {                                           \
            vf w[NP];                                                                        \
            for (int j = 0; j < NP; j++) w[j] = loadv(q + VL * j);                           \
            for (int t = 0; t < NT; t++)                                                     \
                for (int j = 0; j < NP; j++) a[t][j] += w[j] * x[t * xs + c];               \
        }                                                                                    \
        for (int t = 0; t < NT; t++) memcpy(y + t * ys + b * RB + r0, a[t], sizeof a[t]);   \
    }
/* One token: the whole block in one pass, strictly in address order (what the prefetchers follow
 * best); SETS sums per row vector, set s taking the columns c = s mod SETS, added up at the end. */
#define PRODUCT_ONE                                                                           \
    vf acc[SETS][NV];                                                                        \
    memset(acc, 0, sizeof acc);                                                              \
    long c = 0;                                                                              \
    for (; c + SETS <= cols; c += SETS, p += SETS * RB)                                      \
        for (int s = 0; s < SETS; s++) {                                                     \
            prefetch_column(p + s * RB);                                                     \
            float xc = x[c + s];                                                             \
            for (int j = 0; j < NV; j++) acc[s][j] += loadv(p + s * RB + VL * j) * xc;       \
        }                                                                                    \
    for (; c < cols; c++, p += RB)                                                           \
        for (int j = 0; j < NV; j++) acc[0][j] += loadv(p + VL * j) * x[c];                  \
    for (int s = 1; s < SETS; s++)                                                           \
        for (int j = 0; j < NV; j++) acc[0][j] += acc[s][j];                                 \
    memcpy(y + b * RB, acc[0], sizeof acc[0]);
#define BLOCK_PTR(b) (P + (b) * cols * RB)

static const XT* product_input(const float* x, long xs, int T, long cols, uint32_t* xp) {
    (void)xs, (void)T, (void)cols, (void)xp;
    return x;
}
#define INPUT_STRIDE(xs, cols) (xs)
#endif

/* Block b for one token (decoding). */
static void product_one(const WT* P, const XT* x, long cols, long b, float* y) {
    const long xs = 0, ys = 0;  /* one input, one output (PRODUCT_BODY(1) indexes by token) */
    (void)xs, (void)ys;
    __typeof__(BLOCK_PTR(0)) p = BLOCK_PTR(b);
    PRODUCT_ONE
}

/* Block b for nt <= GROUP tokens: inputs xs apart, outputs ys apart. */
static void product_group(const WT* P, const XT* x, long xs, int nt, long cols, long b, float* y, long ys) {
    __typeof__(BLOCK_PTR(0)) p = BLOCK_PTR(b);
    switch (nt) {
        case 1: { PRODUCT_BODY(1) break; }
        case 2: { PRODUCT_BODY(2) break; }
        case 3: { PRODUCT_BODY(3) break; }
        default: { PRODUCT_BODY(GROUP) break; }
    }
}

/* Blocks [b0, b1) for T tokens: y[t * ys + r] = (W x_t)[r]. */
static void product(const WT* P, const XT* x, long xs, int T, long cols, long b0, long b1, float* y, long ys) {
    for (long b = b0; b < b1; b++) {
        if (T == 1) {
            product_one(P, x, cols, b, y);
            continue;
        }
        for (int t0 = 0; t0 < T; t0 += GROUP)
            product_group(P, x + t0 * xs, xs, T - t0 < GROUP ? T - t0 : GROUP, cols, b, y + t0 * ys, ys);
    }
}

static inline float gelu_tanh(float v) {
    return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

enum epilogue { PLAIN, BIAS, RESIDUAL, GELU };

/* y_t = W x_t for T inputs (xs apart) and a packed (rows, cols) weight, shared out over the team in
 * blocks; outputs ys apart. Then per row PLAIN: y = Wx; BIAS: y = Wx + b; RESIDUAL: out += Wx + b
 * (out os apart; y is scratch); GELU: y = gelu(Wx + b). Ends with the team's barrier. */
static void parallel_product(const WT* P, const float* x, long xs, int T, long rows, long cols, const float* b,
                             enum epilogue kind, float* y, long ys, float* out, long os, uint32_t* xp) {
    long nb = (rows + RB - 1) / RB;
    const XT* input = product_input(x, xs, T, cols, xp);
    #pragma omp for schedule(static)  /* one run of blocks per thread: claiming blocks one by one measured slower */
    for (long blk = 0; blk < nb; blk++) {
        product(P, input, INPUT_STRIDE(xs, cols), T, cols, blk, blk + 1, y, ys);
        long end = (blk + 1) * RB < rows ? (blk + 1) * RB : rows;
        for (int t = 0; t < T; t++) {
            float *yt = y + t * ys, *ot = out ? out + t * os : NULL;
            for (long r = blk * RB; r < end; r++) {
                if (kind == BIAS && b) yt[r] += b[r];
                else if (kind == RESIDUAL) ot[r] += yt[r] + b[r];
                else if (kind == GELU) yt[r] = gelu_tanh(yt[r] + b[r]);
            }
        }
    }
}

/* The sum of a vector's lanes, as a tree (a chain of 15 scalar additions waits ~4x longer). */
static inline float hsum(vf v) {
#if VL == 16
    v = v + __builtin_shuffle(v, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v = v + __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
    v = v + __builtin_shuffle(v, (vi){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
#elif VL == 8
    v = v + __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3});
    v = v + __builtin_shuffle(v, (vi){2, 3, 0, 1, 2, 3, 0, 1});
#else
    v = v + __builtin_shuffle(v, (vi){2, 3, 0, 1});
#endif
    return v[0] + v[1];
}

/* exp(x) for VL values x <= 0 (softmax after subtracting the maximum): 2^k e^r with k = round(x / ln 2)
 * and a degree-6 Taylor polynomial for e^r, |r| <= ln 2 / 2 (relative error < 3e-7; expf:
 * ~1e-7); below -87 it returns e^-87 instead of a denormal, ~1e-38 next to the maximum's 1. */
static inline vf expv(vf x) {
    vi low = x < -87.f;
    x = (vf)(((vi)x & ~low) | ((vi)((vf){0} - 87.f) & low));
    vf k = (x * 1.44269504f + 12582912.f) - 12582912.f;  /* round to nearest: 1.5 * 2^23 */
    vf r = x - k * 0.693145752f - k * 1.42860677e-06f;  /* ln 2 in two parts: exact k * hi */
    vf p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    vi scale = (__builtin_convertvector(k, vi) + 127) << 23;
    return p * (vf)scale;
}

/* a . b over n values (a float32, b of the weights' type): the attention scores. */
static inline float dot(const float* a, const WT* b, int n) {
    vf acc = {0};
    int i = 0;
    for (; i + VL <= n; i += VL) acc += *(const vfu*)(a + i) * loadv(b + i);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * wt_to_f(b[i]);
    return s;
}

/* out += p * b over n values: the attention's weighted sum of values. */
static inline void axpy(float p, const WT* b, float* out, int n) {
    int i = 0;
    for (; i + VL <= n; i += VL) *(vfu*)(out + i) += p * loadv(b + i);
    for (; i < n; i++) out[i] += p * wt_to_f(b[i]);
}

static void layer_norm(const float* x, const float* w, const float* b, int n, float eps, float* out) {
    vf acc = {0};
    int i = 0;
    for (; i + VL <= n; i += VL) acc += *(const vfu*)(x + i);
    float mean = hsum(acc);
    for (; i < n; i++) mean += x[i];
    mean /= n;
    vf sq = {0};
    for (i = 0; i + VL <= n; i += VL) {
        vf d = *(const vfu*)(x + i) - mean;
        sq += d * d;
    }
    float var = hsum(sq);
    for (; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float rstd = 1.f / sqrtf(var / n + eps);
    for (i = 0; i < n; i++) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

#define PAD(n) (((n) + RB - 1) / RB * RB)

/* One query q (D values) over one head's keys K and values V at positions 0..last:
 * out = softmax(q.K / sqrt(D)) V. */
static inline void attend_one(const float* q, const WT* K, const WT* V, int D, long last, float* scores, float* out) {
    float scale = 1.f / sqrtf((float)D);
    float top = -INFINITY, total = 0.f;
    for (long j = 0; j <= last; j++) {
        scores[j] = dot(q, K + j * D, D) * scale;
        top = scores[j] > top ? scores[j] : top;
    }
    long j = 0;
    vf sums = {0};
    for (; j + VL <= last + 1; j += VL) {
        vf e = expv(*(vfu*)(scores + j) - top);
        *(vfu*)(scores + j) = e;
        sums += e;
    }
    total = hsum(sums);
    for (; j <= last; j++) total += scores[j] = expf(scores[j] - top);
    for (int d = 0; d < D; d++) out[d] = 0.f;
    for (long j = 0; j <= last; j++) axpy(scores[j] / total, V + j * D, out, D);
}

/* Head h for T new tokens at positions pos..pos+T-1: store their keys/values, then for each token
 * softmax(q.K / sqrt(D)) V over the positions up to its own. */
static void attend(const Model* m, int h, int T, WT* kc, WT* vc, long max_len, long pos, float* scores) {
    int D = m->head_dim, C = m->emb;
    long ld3 = PAD(3 * C), ldc = PAD(C);
    WT *K = kc + h * max_len * D, *V = vc + h * max_len * D;
    for (int t = 0; t < T; t++) {
        const float *k = m->qkv + t * ld3 + C + h * D, *v = m->qkv + t * ld3 + 2 * C + h * D;
        for (int d = 0; d < D; d++) {
            K[(pos + t) * D + d] = f_to_wt(k[d]);
            V[(pos + t) * D + d] = f_to_wt(v[d]);
        }
    }
    for (int t = 0; t < T; t++)
        attend_one(m->qkv + t * ld3 + h * D, K, V, D, pos + t, scores, m->att + t * ldc + h * D);
}

/* Inside the parallel region, for T rows of m->x: the first layer norm and the qkv product into m->qkv. */
static void block_qkv(const Model* m, const Layer* ly, int T, float* xn, uint32_t* xp) {
    int C = m->emb;
    long ldc = PAD(C), ld3 = PAD(3 * C);
    for (int t = 0; t < T; t++) layer_norm(m->x + t * ldc, ly->ln1_w, ly->ln1_b, C, m->eps, xn + t * C);
    parallel_product(ly->qkv, xn, C, T, 3 * C, C, ly->qkv_b, BIAS, m->qkv, ld3, NULL, 0, xp);
}

/* Inside the parallel region, after attention wrote m->att: the output projection and its residual, the
 * second layer norm, the MLP and its residual, for T rows. */
static void block_after_attention(const Model* m, const Layer* ly, int T, float* xn, uint32_t* xp) {
    int C = m->emb, H4 = m->hidden;
    long ldc = PAD(C), ldh = PAD(H4);
    parallel_product(ly->out, m->att, ldc, T, C, C, ly->out_b, RESIDUAL, m->h, ldc, m->x, ldc, xp);
    for (int t = 0; t < T; t++) layer_norm(m->x + t * ldc, ly->ln2_w, ly->ln2_b, C, m->eps, xn + t * C);
    parallel_product(ly->fc, xn, C, T, H4, C, ly->fc_b, GELU, m->h, ldh, NULL, 0, xp);
    parallel_product(ly->proj, m->h, ldh, T, C, H4, ly->proj_b, RESIDUAL, m->att, ldc, m->x, ldc, xp);
}

/* Logits (vocab_rows) of the token after `tokens` (T <= max_tokens of them, at positions pos..pos+T-1);
 * writes their keys/values into k_cache/v_cache (n_layers, n_heads, max_len, head_dim), whose
 * positions < pos are filled. */
void SUFFIX(decode_tokens)(const Model* m, const int64_t* tokens, int T, long pos, WT* k_cache, WT* v_cache,
                           long max_len) {
    int C = m->emb, L = m->n_layers, H4 = m->hidden;
    long ldc = PAD(C);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < C; i++)
            m->x[t * ldc + i] = wt_to_f(m->tok_emb[tokens[t] * C + i]) + wt_to_f(m->pos_emb[(pos + t) * C + i]);
    #pragma omp parallel num_threads(m->n_threads)
    {
        /* this thread's own: the normalised inputs, the products' input pairs (bfloat16), scores */
        float* xn = m->scratch + omp_get_thread_num() * ((long)m->max_tokens * (C + H4) + max_len);
        uint32_t* xp = (uint32_t*)(xn + (long)m->max_tokens * C);
        float* scores = xn + (long)m->max_tokens * (C + H4);
        for (int l = 0; l < L; l++) {
            const Layer* ly = &m->layers[l];
            long layer_off = (long)l * m->n_heads * max_len * m->head_dim;
            block_qkv(m, ly, T, xn, xp);
            #pragma omp for schedule(static)
            for (int h = 0; h < m->n_heads; h++) attend(m, h, T, k_cache + layer_off, v_cache + layer_off, max_len, pos, scores);
            block_after_attention(m, ly, T, xn, xp);
        }
        layer_norm(m->x + (T - 1) * ldc, m->lnf_w, m->lnf_b, C, m->eps, xn);
        parallel_product(m->head, xn, C, 1, m->vocab_rows, C, NULL, PLAIN, m->logits, 0, NULL, 0, xp);
    }
}

/* Continuous batching (gptlab/serve): one new token for each of B sequences, each with its own cache
 * (n_layers, n_heads, max_len, head_dim; positions < pos[t] filled) and position. Row t is token
 * tokens[t] at position pos[t] of the sequence whose caches are k_caches[t] / v_caches[t]; its logits
 * (vocab_rows) go to logits + t * ldl. The products read each weight block once for up to GROUP rows
 * (B <= max_tokens), as a prompt's tokens do; attention is per row, over its own cache. */
void SUFFIX(decode_rows)(const Model* m, const int64_t* tokens, int B, const int64_t* pos, WT* const* k_caches,
                         WT* const* v_caches, long max_len, float* logits, long ldl) {
    int C = m->emb, L = m->n_layers, H4 = m->hidden, H = m->n_heads, D = m->head_dim;
    long ldc = PAD(C), ld3 = PAD(3 * C);
    for (int t = 0; t < B; t++)
        for (int i = 0; i < C; i++)
            m->x[t * ldc + i] = wt_to_f(m->tok_emb[tokens[t] * C + i]) + wt_to_f(m->pos_emb[pos[t] * C + i]);
    #pragma omp parallel num_threads(m->n_threads)
    {
        float* xn = m->scratch + omp_get_thread_num() * ((long)m->max_tokens * (C + H4) + max_len);
        uint32_t* xp = (uint32_t*)(xn + (long)m->max_tokens * C);
        float* scores = xn + (long)m->max_tokens * (C + H4);
        for (int l = 0; l < L; l++) {
            const Layer* ly = &m->layers[l];
            long layer_off = (long)l * H * max_len * D;
            block_qkv(m, ly, B, xn, xp);
            #pragma omp for schedule(static)
            for (int i = 0; i < B * H; i++) {  /* (row, head) pairs: rows have different lengths */
                int t = i / H, h = i % H;
                WT *K = k_caches[t] + layer_off + h * max_len * D, *V = v_caches[t] + layer_off + h * max_len * D;
                const float *q = m->qkv + t * ld3 + h * D, *k = q + C, *v = q + 2 * C;
                for (int d = 0; d < D; d++) {
                    K[pos[t] * D + d] = f_to_wt(k[d]);
                    V[pos[t] * D + d] = f_to_wt(v[d]);
                }
                attend_one(q, K, V, D, pos[t], scores, m->att + t * ldc + h * D);
            }
            block_after_attention(m, ly, B, xn, xp);
        }
        for (int t = 0; t < B; t++) layer_norm(m->x + t * ldc, m->lnf_w, m->lnf_b, C, m->eps, xn + t * C);
        parallel_product(m->head, xn, C, B, m->vocab_rows, C, NULL, PLAIN, logits, ldl, NULL, 0, xp);
    }
}

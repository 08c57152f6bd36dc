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
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(WEIGHTS_BF16) && defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define RB 64                 /* output rows per packed block: 4 vectors of 16 floats */
#define NV (RB / 16)

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

#ifdef WEIGHTS_BF16
typedef uint16_t WT;
static inline float wt_to_f(WT w) { uint32_t u = (uint32_t)w << 16; float f; memcpy(&f, &u, 4); return f; }
static inline WT f_to_wt(float f) {  /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (WT)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (WT)(u >> 16);
}
static inline v16 load16(const WT* p) {
    u32x16 u = __builtin_convertvector(*(const u16x16*)p, u32x16) << 16;
    return (v16)u;
}
#define SUFFIX(name) name##_bf16
#else
typedef float WT;
static inline float wt_to_f(WT w) { return w; }
static inline WT f_to_wt(float f) { return f; }
static inline v16 load16(const WT* p) { return *(const v16u*)p; }
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

/* Products over the blocks [b0, b1) of a packed (rows, cols) weight, for T input vectors:
 * y[t * ys + r] = (W x_t)[r]. One token (decoding) has its own loop, tuned for streaming; several
 * tokens (a prompt) reuse each loaded line for up to GROUP of them, so the weights are read from
 * memory once per block and the rest of the passes come from the core's caches. */
#define GROUP 4

#ifdef WEIGHTS_BF16
/* bfloat16 blocks hold column pairs, P[block][cols / 2][RB][2]: a 32-bit lane is one row's weights
 * for columns c and c + 1, and the input is given as the matching bfloat16 pairs (cols even). */
typedef uint32_t u32x16u __attribute__((vector_size(64), aligned(4)));
typedef uint32_t XT;  /* what a product reads per column pair: two bfloat16 inputs */
#define XCOLS(cols) ((cols) / 2)

#ifdef __AVX512BF16__
/* one instruction per line and token: 16 rows x 2 columns multiplied and summed into float32 */
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
#else
#define PRODUCT_BODY(NT)                                                                      \
    v16 a[NT][NV];                                                                           \
    memset(a, 0, sizeof a);                                                                  \
    for (long c = 0; c < cols / 2; c++, p += RB) {                                           \
        u32x16 w[NV];                                                                        \
        for (int j = 0; j < NV; j++) w[j] = *(const u32x16u*)(p + 16 * j);                  \
        for (int t = 0; t < NT; t++) {                                                       \
            uint32_t lo = x[t * xs + c] << 16, hi = x[t * xs + c] & 0xffff0000u;             \
            float x0, x1;                                                                    \
            memcpy(&x0, &lo, 4);                                                             \
            memcpy(&x1, &hi, 4);                                                             \
            for (int j = 0; j < NV; j++)                                                     \
                a[t][j] += (v16)(w[j] << 16) * x0 + (v16)(w[j] & 0xffff0000u) * x1;         \
        }                                                                                    \
    }                                                                                        \
    for (int t = 0; t < NT; t++) memcpy(y + t * ys + b * RB, a[t], sizeof a[t]);
#endif
#define BLOCK_PTR(b) ((const uint32_t*)(P + (b) * cols * RB))
#define PRODUCT_ONE PRODUCT_BODY(1)

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
#define PRODUCT_BODY(NT)                                                                      \
    v16 a[NT][NV];                                                                           \
    memset(a, 0, sizeof a);                                                                  \
    for (long c = 0; c < cols; c++, p += RB) {                                               \
        v16 w[NV];                                                                           \
        for (int j = 0; j < NV; j++) w[j] = load16(p + 16 * j);                             \
        for (int t = 0; t < NT; t++)                                                         \
            for (int j = 0; j < NV; j++) a[t][j] += w[j] * x[t * xs + c];                   \
    }                                                                                        \
    for (int t = 0; t < NT; t++) memcpy(y + t * ys + b * RB, a[t], sizeof a[t]);
/* one token: two sums per row block, so the next multiply-add need not wait for the last */
#define PRODUCT_ONE                                                                           \
    v16 acc[NV] = {0}, odd[NV] = {0};                                                        \
    long c = 0;                                                                              \
    for (; c + 2 <= cols; c += 2, p += 2 * RB) {                                             \
        float x0 = x[c], x1 = x[c + 1];                                                      \
        for (int j = 0; j < NV; j++) acc[j] += load16(p + 16 * j) * x0;                     \
        for (int j = 0; j < NV; j++) odd[j] += load16(p + RB + 16 * j) * x1;                \
    }                                                                                        \
    if (c < cols)                                                                            \
        for (int j = 0; j < NV; j++) acc[j] += load16(p + 16 * j) * x[c];                   \
    for (int j = 0; j < NV; j++) acc[j] += odd[j];                                           \
    memcpy(y + b * RB, acc, sizeof acc);
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

/* The sum of a vector's 16 lanes, as a tree (a chain of 15 scalar additions waits ~4x longer). */
static inline float hsum(v16 v) {
    typedef int32_t i16 __attribute__((vector_size(64)));
    v = v + __builtin_shuffle(v, (i16){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v = v + __builtin_shuffle(v, (i16){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
    v = v + __builtin_shuffle(v, (i16){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
    return v[0] + v[1];
}

/* exp(x) for 16 values x <= 0 (softmax after subtracting the maximum): 2^k e^r with k = round(x / ln 2)
 * and a degree-6 Taylor polynomial for e^r, |r| <= ln 2 / 2 (relative error < 3e-7; expf:
 * ~1e-7); below -87 it returns e^-87 instead of a denormal, ~1e-38 next to the maximum's 1. */
static inline v16 exp16(v16 x) {
    typedef int32_t i16 __attribute__((vector_size(64)));
    i16 low = x < -87.f;
    x = (v16)(((i16)x & ~low) | ((i16)((v16){0} - 87.f) & low));
    v16 k = (x * 1.44269504f + 12582912.f) - 12582912.f;  /* round to nearest: 1.5 * 2^23 */
    v16 r = x - k * 0.693145752f - k * 1.42860677e-06f;  /* ln 2 in two parts: exact k * hi */
    v16 p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    i16 scale = (__builtin_convertvector(k, i16) + 127) << 23;
    return p * (v16)scale;
}

/* a . b over n values (a float32, b of the weights' type): the attention scores. */
static inline float dot(const float* a, const WT* b, int n) {
    v16 acc = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) acc += *(const v16u*)(a + i) * load16(b + i);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * wt_to_f(b[i]);
    return s;
}

/* out += p * b over n values: the attention's weighted sum of values. */
static inline void axpy(float p, const WT* b, float* out, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) *(v16u*)(out + i) += p * load16(b + i);
    for (; i < n; i++) out[i] += p * wt_to_f(b[i]);
}

static void layer_norm(const float* x, const float* w, const float* b, int n, float eps, float* out) {
    v16 acc = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) acc += *(const v16u*)(x + i);
    float mean = hsum(acc);
    for (; i < n; i++) mean += x[i];
    mean /= n;
    v16 sq = {0};
    for (i = 0; i + 16 <= n; i += 16) {
        v16 d = *(const v16u*)(x + i) - mean;
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
    v16 sums = {0};
    for (; j + 16 <= last + 1; j += 16) {
        v16 e = exp16(*(v16u*)(scores + j) - top);
        *(v16u*)(scores + j) = e;
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

/* Logits (vocab_rows) of the token after `tokens` (T <= max_tokens of them, at positions pos..pos+T-1);
 * writes their keys/values into k_cache/v_cache (n_layers, n_heads, max_len, head_dim), whose
 * positions < pos are filled. */
void SUFFIX(decode_tokens)(const Model* m, const int64_t* tokens, int T, long pos, WT* k_cache, WT* v_cache,
                           long max_len) {
    int C = m->emb, L = m->n_layers, H4 = m->hidden;
    long ldc = PAD(C), ld3 = PAD(3 * C), ldh = PAD(H4);
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
            for (int t = 0; t < T; t++) layer_norm(m->x + t * ldc, ly->ln1_w, ly->ln1_b, C, m->eps, xn + t * C);
            parallel_product(ly->qkv, xn, C, T, 3 * C, C, ly->qkv_b, BIAS, m->qkv, ld3, NULL, 0, xp);
            #pragma omp for schedule(static)
            for (int h = 0; h < m->n_heads; h++) attend(m, h, T, k_cache + layer_off, v_cache + layer_off, max_len, pos, scores);
            parallel_product(ly->out, m->att, ldc, T, C, C, ly->out_b, RESIDUAL, m->h, ldc, m->x, ldc, xp);
            for (int t = 0; t < T; t++) layer_norm(m->x + t * ldc, ly->ln2_w, ly->ln2_b, C, m->eps, xn + t * C);
            parallel_product(ly->fc, xn, C, T, H4, C, ly->fc_b, GELU, m->h, ldh, NULL, 0, xp);
            parallel_product(ly->proj, m->h, ldh, T, C, H4, ly->proj_b, RESIDUAL, m->att, ldc, m->x, ldc, xp);
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
    long ldc = PAD(C), ld3 = PAD(3 * C), ldh = PAD(H4);
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
            for (int t = 0; t < B; t++) layer_norm(m->x + t * ldc, ly->ln1_w, ly->ln1_b, C, m->eps, xn + t * C);
            parallel_product(ly->qkv, xn, C, B, 3 * C, C, ly->qkv_b, BIAS, m->qkv, ld3, NULL, 0, xp);
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
            parallel_product(ly->out, m->att, ldc, B, C, C, ly->out_b, RESIDUAL, m->h, ldc, m->x, ldc, xp);
            for (int t = 0; t < B; t++) layer_norm(m->x + t * ldc, ly->ln2_w, ly->ln2_b, C, m->eps, xn + t * C);
            parallel_product(ly->fc, xn, C, B, H4, C, ly->fc_b, GELU, m->h, ldh, NULL, 0, xp);
            parallel_product(ly->proj, m->h, ldh, B, C, H4, ly->proj_b, RESIDUAL, m->att, ldc, m->x, ldc, xp);
        }
        for (int t = 0; t < B; t++) layer_norm(m->x + t * ldc, m->lnf_w, m->lnf_b, C, m->eps, xn + t * C);
        parallel_product(m->head, xn, C, B, m->vocab_rows, C, NULL, PLAIN, logits, ldl, NULL, 0, xp);
    }
}

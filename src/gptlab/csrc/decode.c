/* One batch-1 decoding step of a GPT-2 model on CPU: see gptlab/decode_kernel.py.
 *
 * Decoding one token reads every weight once, so it runs at the speed the cores stream the weights.
 * The weights of each product are repacked (by decode_kernel.py) in blocks of RB output rows,
 * column by column: P[block][in][RB]. The inner loop then reads memory strictly in order and
 * multiplies each loaded line by one broadcast input value: one load per cache line of weights.
 * (Row-major rows need a second load of the input per line; on the development CPU the cores then
 * stream ~15% slower, because in-flight loads, not DRAM, are the limit.)
 *
 * Built by decode_kernel.py with the machine's C compiler (-O3 -march=native -fopenmp), once per
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

/* Pointers of one layer, in the order decode_kernel.py fills them. Vectors are float32. */
typedef struct {
    const float *ln1_w, *ln1_b, *qkv_b, *out_b, *ln2_w, *ln2_b, *fc_b, *proj_b;
    const WT *qkv, *out, *fc, *proj;   /* packed weights */
} Layer;

typedef struct {
    int n_layers, emb, n_heads, head_dim, hidden, vocab_rows, n_threads;
    float eps;
    const WT *tok_emb, *pos_emb;      /* the model's own (rows, emb) tables */
    const float *lnf_w, *lnf_b;
    const WT *head;                   /* packed LM head */
    const Layer* layers;
    float *x, *qkv, *att, *h, *logits;  /* shared work buffers, each >= the largest padded row count */
    float* scratch;                     /* per thread: emb + hidden + max_len floats */
} Model;

/* y[r] for the rows of blocks [b0, b1) of a packed (rows, cols) weight: y = W x. */
#ifdef WEIGHTS_BF16
/* bfloat16 blocks hold column pairs, P[block][cols / 2][RB][2]: a 32-bit lane is one row's weights
 * for columns c and c + 1, and `xp` holds x as the matching bfloat16 pairs (cols even). */
typedef uint32_t u32x16u __attribute__((vector_size(64), aligned(4)));
static void product(const WT* P, const uint32_t* xp, long cols, long b0, long b1, float* y) {
    for (long b = b0; b < b1; b++) {
        const uint32_t* p = (const uint32_t*)(P + b * cols * RB);
        v16 acc[NV] = {0};
#ifdef __AVX512BF16__
        /* one instruction per line: 16 rows x 2 columns multiplied and summed into float32 */
        __m512 a[NV];
        for (int j = 0; j < NV; j++) a[j] = _mm512_setzero_ps();
        for (long c = 0; c < cols / 2; c++, p += RB) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp[c]);
            for (int j = 0; j < NV; j++) a[j] = _mm512_dpbf16_ps(a[j], (__m512bh)_mm512_loadu_si512(p + 16 * j), xb);
        }
        for (int j = 0; j < NV; j++) acc[j] = (v16)a[j];
#else
        for (long c = 0; c < cols / 2; c++, p += RB) {
            uint32_t pair = xp[c];
            float x0, x1;
            uint32_t lo = pair << 16, hi = pair & 0xffff0000u;
            memcpy(&x0, &lo, 4);
            memcpy(&x1, &hi, 4);
            for (int j = 0; j < NV; j++) {
                u32x16 w = *(const u32x16u*)(p + 16 * j);
                acc[j] += (v16)(w << 16) * x0 + (v16)(w & 0xffff0000u) * x1;
            }
        }
#endif
        memcpy(y + b * RB, acc, sizeof acc);
    }
}

/* x as bfloat16 pairs, the second operand of the bfloat16 product. */
static const uint32_t* product_input(const float* x, long cols, uint32_t* xp) {
    for (long c = 0; c < cols / 2; c++) xp[c] = (uint32_t)f_to_wt(x[2 * c]) | (uint32_t)f_to_wt(x[2 * c + 1]) << 16;
    return xp;
}
#else
static void product(const float* P, const float* x, long cols, long b0, long b1, float* y) {
    for (long b = b0; b < b1; b++) {
        const float* p = P + b * cols * RB;
        v16 acc[NV] = {0}, odd[NV] = {0};  /* two sums: the next FMA need not wait for the last */
        long c = 0;
        for (; c + 2 <= cols; c += 2, p += 2 * RB) {
            float x0 = x[c], x1 = x[c + 1];
            for (int j = 0; j < NV; j++) acc[j] += load16(p + 16 * j) * x0;
            for (int j = 0; j < NV; j++) odd[j] += load16(p + RB + 16 * j) * x1;
        }
        if (c < cols)
            for (int j = 0; j < NV; j++) acc[j] += load16(p + 16 * j) * x[c];
        for (int j = 0; j < NV; j++) acc[j] += odd[j];
        memcpy(y + b * RB, acc, sizeof acc);
    }
}

static const float* product_input(const float* x, long cols, uint32_t* xp) {
    (void)cols, (void)xp;
    return x;
}
#endif

static inline float gelu_tanh(float v) {
    return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

enum epilogue { PLAIN, BIAS, RESIDUAL, GELU };

/* out = W x for a packed (rows, cols) weight, shared out over the team in blocks; then per row
 * PLAIN: y = Wx; BIAS: y = Wx + b; RESIDUAL: out += Wx + b (y is scratch); GELU: y = gelu(Wx + b).
 * Ends with the team's barrier. */
static void parallel_product(const WT* P, const float* x, long rows, long cols, const float* b,
                             enum epilogue kind, float* y, float* out, uint32_t* xp) {
    long nb = (rows + RB - 1) / RB;
    const void* input = product_input(x, cols, xp);
    #pragma omp for schedule(static)  /* one run of blocks per thread: claiming blocks one by one measured slower */
    for (long blk = 0; blk < nb; blk++) {
        product(P, input, cols, blk, blk + 1, y);
        long end = (blk + 1) * RB < rows ? (blk + 1) * RB : rows;
        for (long r = blk * RB; r < end; r++) {
            if (kind == BIAS && b) y[r] += b[r];
            else if (kind == RESIDUAL) out[r] += y[r] + b[r];
            else if (kind == GELU) y[r] = gelu_tanh(y[r] + b[r]);
        }
    }
}

static inline float hsum(v16 v) {
    float s = 0.f;
    for (int k = 0; k < 16; k++) s += v[k];
    return s;
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

/* Head h: store this token's key/value at `pos`, then softmax(q.K / sqrt(D)) V over positions 0..pos. */
static void attend(const Model* m, int h, WT* kc, WT* vc, long max_len, long pos, float* scores) {
    int D = m->head_dim, C = m->emb;
    const float *q = m->qkv + h * D, *k = m->qkv + C + h * D, *v = m->qkv + 2 * C + h * D;
    WT *K = kc + h * max_len * D, *V = vc + h * max_len * D;
    for (int d = 0; d < D; d++) {
        K[pos * D + d] = f_to_wt(k[d]);
        V[pos * D + d] = f_to_wt(v[d]);
    }
    float scale = 1.f / sqrtf((float)D), top = -INFINITY, total = 0.f;
    for (long j = 0; j <= pos; j++) {
        scores[j] = dot(q, K + j * D, D) * scale;
        top = scores[j] > top ? scores[j] : top;
    }
    for (long j = 0; j <= pos; j++) total += scores[j] = expf(scores[j] - top);
    float* out = m->att + h * D;
    for (int d = 0; d < D; d++) out[d] = 0.f;
    for (long j = 0; j <= pos; j++) axpy(scores[j] / total, V + j * D, out, D);
}

/* Logits (vocab_rows) of the token after `token` at position `pos`; writes its keys/values into
 * k_cache/v_cache (n_layers, n_heads, max_len, head_dim), whose positions < pos are filled. */
void SUFFIX(decode_step)(const Model* m, long token, long pos, WT* k_cache, WT* v_cache, long max_len) {
    int C = m->emb, L = m->n_layers;
    for (int i = 0; i < C; i++) m->x[i] = wt_to_f(m->tok_emb[token * C + i]) + wt_to_f(m->pos_emb[pos * C + i]);
    #pragma omp parallel num_threads(m->n_threads)
    {
        /* this thread's own: normalised x, the product's input pairs (bfloat16), attention scores */
        float* xn = m->scratch + omp_get_thread_num() * (C + m->hidden + max_len);
        uint32_t* xp = (uint32_t*)(xn + C);
        float* scores = xn + C + m->hidden;
        for (int l = 0; l < L; l++) {
            const Layer* ly = &m->layers[l];
            long layer_off = (long)l * m->n_heads * max_len * m->head_dim;
            layer_norm(m->x, ly->ln1_w, ly->ln1_b, C, m->eps, xn);
            parallel_product(ly->qkv, xn, 3 * C, C, ly->qkv_b, BIAS, m->qkv, NULL, xp);
            #pragma omp for schedule(static)
            for (int h = 0; h < m->n_heads; h++) attend(m, h, k_cache + layer_off, v_cache + layer_off, max_len, pos, scores);
            parallel_product(ly->out, m->att, C, C, ly->out_b, RESIDUAL, m->h, m->x, xp);
            layer_norm(m->x, ly->ln2_w, ly->ln2_b, C, m->eps, xn);
            parallel_product(ly->fc, xn, m->hidden, C, ly->fc_b, GELU, m->h, NULL, xp);
            parallel_product(ly->proj, m->h, C, m->hidden, ly->proj_b, RESIDUAL, m->att, m->x, xp);
        }
        layer_norm(m->x, m->lnf_w, m->lnf_b, C, m->eps, xn);
        parallel_product(m->head, xn, m->vocab_rows, C, NULL, PLAIN, m->logits, NULL, xp);
    }
}

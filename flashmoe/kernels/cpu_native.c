/* flashmoe's CPU kernels: float32 activations times matrices in the store's own group-wise affine format
 * (w = q * scale + bias per group of the input dimension; uint8 codes packed little end first; fp16 or bf16
 * scales and biases), read where they lie: an expert straight from its RAM slot, no repacking.
 *
 * One OpenMP region per call, so a layer's routed experts cost one fork/join, not one per torch op. Rows are
 * split across threads and every output element is summed by one thread in a fixed order, so results do not
 * depend on the thread count. Built on first use by kernels/cpu_native.py (cc -O3 -march=native -fopenmp);
 * GCC/Clang vector extensions keep it portable (AVX-512, AVX2 or NEON, whatever -march=native has).
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));

/* unaligned loads (a memcpy into a vector made GCC 12 assemble it byte by byte) */
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));
typedef uint8_t v16b_u __attribute__((vector_size(16), aligned(1)));

static inline v16f load_f32(const float *p) { return *(const v16f_u *)p; }
static inline v16b load_bytes(const uint8_t *p) { return *(const v16b_u *)p; }

static inline float f16_to_f32(uint16_t h) {
    /* exponent rebias by multiplication: right for normals and subnormals (quantize never writes inf/nan) */
    union { uint32_t u; float f; } v = { (uint32_t)(h & 0x7fff) << 13 };
    v.f *= 0x1p112f;
    v.u |= (uint32_t)(h & 0x8000) << 16;
    return v.f;
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static inline float half(const uint16_t *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(p[i]) : f16_to_f32(p[i]);
}

static inline v16f bytes_to_f32(v16b b) {
#ifdef __AVX512F__  /* GCC 12 widens a byte vector element by element otherwise */
    return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32((__m128i)b));
#else
    return __builtin_convertvector(__builtin_convertvector(b, v16i), v16f);
#endif
}

static inline float hsum(v16f v) {
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* An activation vector laid out for the codes it meets: at 4 bits each run of 32 inputs as its 16 even ones then
 * its 16 odd ones (a byte's low and high nibbles); at 8 bits as it is; at 2 bits as it is (scalar path). Plus the
 * sum of each group, which the group's bias multiplies. */
static void arrange(const float *x, int k, int bits, int g, float *xa, float *xs) {
    if (bits == 4) {
        for (int c = 0; c < k; c += 32)
            for (int j = 0; j < 16; j++) {
                xa[c + j] = x[c + 2 * j];
                xa[c + 16 + j] = x[c + 2 * j + 1];
            }
    } else {
        memcpy(xa, x, sizeof(float) * k);
    }
    for (int gi = 0; gi < k / g; gi++) {
        float s = 0.f;
        for (int j = 0; j < g; j++) s += x[gi * g + j];
        xs[gi] = s;
    }
}

static inline float half_at(const uint16_t *p, int64_t i, int bf16) {
#ifdef __FLT16_MAX__  /* one instruction where the machine has F16C */
    return bf16 ? bf16_to_f32(p[i]) : (float)((const _Float16 *)p)[i];
#else
    return bf16 ? bf16_to_f32(p[i]) : f16_to_f32(p[i]);
#endif
}

/* sum over groups of bias * (the group's sum of inputs), a vector of groups at a time */
static inline float bias_dot(const uint16_t *biases, int bf16, const float *xs, int groups) {
    float s = 0.f;
    if (bf16) {
        #pragma omp simd reduction(+:s)
        for (int i = 0; i < groups; i++) s += bf16_to_f32(biases[i]) * xs[i];
    } else {
        #pragma omp simd reduction(+:s)
        for (int i = 0; i < groups; i++) s += half_at(biases, i, 0) * xs[i];
    }
    return s;
}

/* R consecutive rows of codes (k inputs each, row_bytes apart; scales and biases `groups` apart) dotted with one
 * arranged vector into y[0..R). Several rows at once share the input's loads and give the FMAs independent chains
 * (one row alone waits on its own accumulator: ~6 G weights/s a core, against ~16 for four). */
#define ROWS_DOT(R)                                                                                                  \
static void rows_dot##R(const uint8_t *p, int64_t row_bytes, const uint16_t *scales, const uint16_t *biases,         \
                        int bf16, const float *xa, const float *xs, int k, int bits, int g, float *y) {              \
    int groups = k / g;                                                                                              \
    v16f acc[R];                                                                                                     \
    for (int r = 0; r < R; r++) acc[r] = (v16f){0};                                                                  \
    for (int gi = 0; gi < groups; gi++) {                                                                            \
        v16f part[R];                                                                                                \
        for (int r = 0; r < R; r++) part[r] = (v16f){0};                                                             \
        if (bits == 4) {                                                                                             \
            for (int c = gi * g; c < (gi + 1) * g; c += 32) {                                                        \
                v16f lo = load_f32(xa + c), hi = load_f32(xa + c + 16);                                              \
                for (int r = 0; r < R; r++) {                                                                        \
                    v16b b = load_bytes(p + r * row_bytes + c / 2);                                                  \
                    part[r] += bytes_to_f32(b & 15) * lo + bytes_to_f32(b >> 4) * hi;                                \
                }                                                                                                    \
            }                                                                                                        \
        } else if (bits == 8) {                                                                                      \
            for (int c = gi * g; c < (gi + 1) * g; c += 16) {                                                        \
                v16f xv = load_f32(xa + c);                                                                          \
                for (int r = 0; r < R; r++) part[r] += bytes_to_f32(load_bytes(p + r * row_bytes + c)) * xv;        \
            }                                                                                                        \
        } else {  /* 2 bits: four codes a byte, a lane at a time */                                                  \
            for (int r = 0; r < R; r++) {                                                                            \
                float s = 0.f;                                                                                       \
                const uint8_t *q = p + r * row_bytes;                                                                \
                for (int i = gi * g; i < (gi + 1) * g; i++) s += (float)((q[i >> 2] >> ((i & 3) * 2)) & 3) * xa[i]; \
                part[r][0] = s;                                                                                      \
            }                                                                                                        \
        }                                                                                                            \
        for (int r = 0; r < R; r++) acc[r] += half_at(scales, (int64_t)r * groups + gi, bf16) * part[r];            \
    }                                                                                                                \
    for (int r = 0; r < R; r++) y[r] = hsum(acc[r]) + bias_dot(biases + (int64_t)r * groups, bf16, xs, groups);     \
}
ROWS_DOT(1)
ROWS_DOT(4)

/* Where a matrix's three parts sit, as byte offsets from a base address (an expert's slot, or 0 for absolute
 * addresses), and its shape and format. */
typedef struct {
    int64_t packed, scales, biases, bias;  /* bias: float32 [n] added to the output (GPT-OSS), < 0: none */
    int32_t n, k, bits, group, bf16;
} fm_matrix;

/* Rows r0..r0+n of a matrix (base + its offsets) times an arranged vector: y[i * stride] for row r0 + i. */
static inline void matrix_rows(const fm_matrix *m, const uint8_t *base, int r0, int n, const float *xa,
                               const float *xs, float *y, int64_t stride) {
    int64_t row_bytes = (int64_t)m->k * m->bits / 8, groups = m->k / m->group;
    float out[4];
    for (int r = r0; r < r0 + n; ) {
        int four = r + 4 <= r0 + n;
        const uint8_t *p = base + m->packed + r * row_bytes;
        const uint16_t *s = (const uint16_t *)(base + m->scales) + r * groups;
        const uint16_t *b = (const uint16_t *)(base + m->biases) + r * groups;
        if (four) rows_dot4(p, row_bytes, s, b, m->bf16, xa, xs, m->k, m->bits, m->group, out);
        else rows_dot1(p, row_bytes, s, b, m->bf16, xa, xs, m->k, m->bits, m->group, out);
        for (int i = 0; i < (four ? 4 : 1); i++, r++) {
            float v = m->bias >= 0 ? out[i] + ((const float *)(base + m->bias))[r] : out[i];
            y[(int64_t)(r - r0) * stride] = v;
        }
    }
}

enum { ROWS = 16 };  /* rows a thread takes at a time */

/* y [t, n] = x [t, k] @ w^T. xa: scratch [t, k]; xs: scratch [t, k / group]. */
void fm_linear(const fm_matrix *w, int t, const float *x, float *y, float *xa, float *xs, int threads) {
    int groups = w->k / w->group;
    for (int i = 0; i < t; i++) arrange(x + (int64_t)i * w->k, w->k, w->bits, w->group, xa + (int64_t)i * w->k,
                                        xs + (int64_t)i * groups);
    int blocks = (w->n + ROWS - 1) / ROWS;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        int r0 = b * ROWS, n = r0 + ROWS < w->n ? ROWS : w->n - r0;
        for (int i = 0; i < t; i++)
            matrix_rows(w, 0, r0, n, xa + (int64_t)i * w->k, xs + (int64_t)i * groups, y + (int64_t)i * w->n + r0, 1);
    }
}

/* A layer's routed experts over (token, expert) pairs grouped by expert:
 *   out[t] = sum over pairs p of token t: weight[p] * down_e(act(gate_up_e(x[t])))
 * experts: e's slot address; first[e]..first[e+1]: its pairs; token[p], weight[p]: each pair's token and routing
 * weight. gate_up is [2I, H] (gate rows, then up rows), down [H, I], offsets within a slot. act: SwiGLU, or with
 * limit > 0 GPT-OSS's clamped one, (up + 1) * gate * sigmoid(alpha * gate).
 * out: [T, H], overwritten, or added to with `accumulate` (each element in the same order as one call over all the
 * experts would: a layer split into several calls gives the same bits).
 * Scratch: xa [T, H], xs [T, H / group], h [P, 2I], aa [P, I], as [P, I / group]. */
void fm_moe(const fm_matrix *gate_up, const fm_matrix *down, int n_experts, const int64_t *experts,
            const int32_t *first, const int32_t *token, const float *weight, int t, const float *x,
            float limit, float alpha, float *out, int accumulate, float *xa, float *xs, float *h, float *aa, float *as,
            int threads) {
    int hidden = gate_up->k, inter = down->k, g = gate_up->group, pairs = first[n_experts];
    int up_blocks = (2 * inter + ROWS - 1) / ROWS, down_blocks = (hidden + ROWS - 1) / ROWS;
    int act_groups = inter / down->group;
    for (int i = 0; i < t; i++) arrange(x + (int64_t)i * hidden, hidden, gate_up->bits, g, xa + (int64_t)i * hidden,
                                        xs + (int64_t)i * (hidden / g));
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(dynamic, 4)
        for (int item = 0; item < n_experts * up_blocks; item++) {
            int e = item / up_blocks, b = item % up_blocks;
            const uint8_t *base = (const uint8_t *)(intptr_t)experts[e];
            int r0 = b * ROWS, n = r0 + ROWS < 2 * inter ? ROWS : 2 * inter - r0;
            for (int p = first[e]; p < first[e + 1]; p++)
                matrix_rows(gate_up, base, r0, n, xa + (int64_t)token[p] * hidden, xs + (int64_t)token[p] * (hidden / g),
                            h + (int64_t)p * 2 * inter + r0, 1);
        }
        #pragma omp for schedule(static)
        for (int p = 0; p < pairs; p++) {
            float *hp = h + (int64_t)p * 2 * inter, act[inter];
            for (int i = 0; i < inter; i++) {
                float gate = hp[i], up = hp[inter + i];
                if (limit > 0.f) {
                    gate = gate < limit ? gate : limit;
                    up = up < -limit ? -limit : (up > limit ? limit : up);
                    act[i] = (up + 1.f) * gate / (1.f + expf(-alpha * gate));
                } else {
                    act[i] = gate / (1.f + expf(-gate)) * up;
                }
            }
            arrange(act, inter, down->bits, down->group, aa + (int64_t)p * inter, as + (int64_t)p * act_groups);
        }
        #pragma omp for schedule(static)
        for (int b = 0; b < down_blocks; b++) {
            int r0 = b * ROWS, n = r0 + ROWS < hidden ? ROWS : hidden - r0;
            float y[ROWS];
            if (!accumulate)
                for (int i = 0; i < t; i++)
                    for (int r = 0; r < n; r++) out[(int64_t)i * hidden + r0 + r] = 0.f;
            for (int e = 0; e < n_experts; e++) {
                const uint8_t *base = (const uint8_t *)(intptr_t)experts[e];
                for (int p = first[e]; p < first[e + 1]; p++) {
                    matrix_rows(down, base, r0, n, aa + (int64_t)p * inter, as + (int64_t)p * act_groups, y, 1);
                    for (int r = 0; r < n; r++) out[(int64_t)token[p] * hidden + r0 + r] += weight[p] * y[r];
                }
            }
        }
    }
}

/* One decode step of the gated delta rule (Gated DeltaNet) for every value head, the state updated in place:
 * the torch reference (kernels/gated_delta.py) is ~30 small ops, here one parallel region over the heads.
 * q, k [hk, dk]; v [hv, dv]; g (log decay), beta [hv]; state [hv, dk, dv]; out [hv, dv]. Value head h reads q/k
 * head h / (hv / hk). q and k are L2-normalised here (x / sqrt(sum x^2 + 1e-6)), q then scaled by dk^-1/2. */
void fm_gated_delta_step(int hk, int hv, int dk, int dv, const float *q, const float *k, const float *v,
                         const float *g, const float *beta, float *state, float *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < hv; h++) {
        const float *qh = q + (int64_t)(h / (hv / hk)) * dk, *kh = k + (int64_t)(h / (hv / hk)) * dk;
        float qn[dk], kn[dk], mem[dv], delta[dv], o[dv], sq = 0.f, sk = 0.f;
        for (int i = 0; i < dk; i++) {
            sq += qh[i] * qh[i];
            sk += kh[i] * kh[i];
        }
        float rq = 1.f / sqrtf(sq + 1e-6f) / sqrtf((float)dk), rk = 1.f / sqrtf(sk + 1e-6f);
        for (int i = 0; i < dk; i++) {
            qn[i] = qh[i] * rq;
            kn[i] = kh[i] * rk;
        }
        float decay = expf(g[h]), b = beta[h];
        float *s = state + (int64_t)h * dk * dv;
        for (int j = 0; j < dv; j++) mem[j] = o[j] = 0.f;
        for (int i = 0; i < dk; i++) {  /* decay, and what the state recalls for k */
            float *row = s + (int64_t)i * dv, ki = kn[i];
            #pragma omp simd
            for (int j = 0; j < dv; j++) {
                row[j] *= decay;
                mem[j] += row[j] * ki;
            }
        }
        for (int j = 0; j < dv; j++) delta[j] = (v[(int64_t)h * dv + j] - mem[j]) * b;
        for (int i = 0; i < dk; i++) {  /* write k -> delta, read q */
            float *row = s + (int64_t)i * dv, ki = kn[i], qi = qn[i];
            #pragma omp simd
            for (int j = 0; j < dv; j++) {
                row[j] += ki * delta[j];
                o[j] += row[j] * qi;
            }
        }
        for (int j = 0; j < dv; j++) out[(int64_t)h * dv + j] = o[j];
    }
}

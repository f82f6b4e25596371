/* flashmoe's CPU kernels: float32 activations times matrices in the store's own group-wise affine format
 * (w = q * scale + bias per group of the input dimension; uint8 codes packed little end first; fp16 or bf16
 * scales and biases), read where they lie: an expert straight from its RAM slot, no repacking.
 *
 * One OpenMP region per call, so a layer's routed experts cost one fork/join, not one per torch op. Rows are
 * split across threads and every output element is summed by one thread in a fixed order, so results do not
 * depend on the thread count. Built on first use by kernels/cpu_native.py (cc -O3 -march=native -fopenmp);
 * GCC/Clang vector extensions keep it portable (AVX-512, AVX2 or NEON, whatever -march=native has).
 */
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__)
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

/* The sum of each group of inputs, which the group's bias multiplies. */
static void group_sums(const float *x, int k, int g, float *xs) {
    for (int gi = 0; gi < k / g; gi++) {
        float s = 0.f;
        for (int j = 0; j < g; j++) s += x[gi * g + j];
        xs[gi] = s;
    }
}

/* An activation vector laid out for the codes it meets (float path): at 4 bits each run of 32 inputs as its 16 even
 * ones then its 16 odd ones (a byte's low and high nibbles); at 8 and 2 bits as it is. */
static void arrange(const float *x, int k, int bits, float *xa) {
    if (bits == 4) {
        for (int c = 0; c < k; c += 32)
            for (int j = 0; j < 16; j++) {
                xa[c + j] = x[c + 2 * j];
                xa[c + 16 + j] = x[c + 2 * j + 1];
            }
    } else {
        memcpy(xa, x, sizeof(float) * k);
    }
}

static inline float half_at(const uint16_t *p, int64_t i, int bf16) {
#ifdef __FLT16_MAX__  /* one instruction where the machine has F16C */
    return bf16 ? bf16_to_f32(p[i]) : (float)((const _Float16 *)p)[i];
#else
    return bf16 ? bf16_to_f32(p[i]) : f16_to_f32(p[i]);
#endif
}

#ifdef __AVX512F__
/* 16 fp16 or bf16 values as float32 (compilers leave a loop of half conversions scalar) */
static inline __m512 halves16(const uint16_t *p, int bf16) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}
#endif


/* sum over groups of bias * (the group's sum of inputs) */
static inline float bias_dot(const uint16_t *biases, int bf16, const float *xs, int groups) {
    float s = 0.f;
    int i = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= groups; i += 16) acc = _mm512_fmadd_ps(halves16(biases + i, bf16), _mm512_loadu_ps(xs + i), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < groups; i++) s += half_at(biases, i, bf16) * xs[i];
    return s;
}

/* NEXT_ROWS: while R rows are read, the same bytes of the R rows after them are prefetched into L2 (a matrix streams
 * from DRAM, rows a block at a time; the hardware prefetcher alone left a 2-core VM's kernels at 11-12 GB/s of 23 on
 * 8-bit experts, 16-19 with this; a prefetch past a matrix's end is harmless: it never faults).
 *
 * R consecutive rows of codes (k inputs each, row_bytes apart; scales and biases `groups` apart) dotted with one
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
        for (int r = 0; r < R; r++) {                                                                                \
            part[r] = (v16f){0};                                                                                     \
            __builtin_prefetch(p + (r + R) * row_bytes + (int64_t)gi * g * bits / 8, 0, 2);  /* NEXT_ROWS */         \
        }                                                                                                            \
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
    int32_t q8;  /* activations rounded to int8 per 32 inputs where the machine has VNNI (q8_path) */
} fm_matrix;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_Q8 1
#else
#define HAVE_Q8 0
#endif
enum { Q8_MAX_K = 32768 };

/* Whether a matrix runs on int8 activations: VNNI's vpdpbusd multiplies 64 unsigned codes by 64 signed bytes in one
 * instruction, against ~10 float instructions for 32 codes (one core, 4 bits: 33 G weights/s against the float
 * path's 15 and torch's int4 kernel's 16). Rounding the activations to 8 bits per 32 inputs is llama.cpp's CPU
 * trade too (tests/test_cpu_native.py bounds the error against the store's own). */
static inline int q8_path(const fm_matrix *m) {
    return HAVE_Q8 && m->q8 && (m->bits == 4 || m->bits == 8) && m->k % 64 == 0 && m->k <= Q8_MAX_K;
}

/* x rounded to int8 per block of 32 inputs (d = max|x| / 127), at 4 bits each run of 64 inputs as its 32 even ones
 * then its 32 odd ones (a 32-byte load's low nibbles, then its high ones), written over the row's float scratch:
 * [k / 32 float d][k int8]. The group sums the biases multiply are those of the rounded inputs: the product is then
 * w . x' for one rounded x', whose error the weights' own magnitudes scale (with the exact sums, the unsigned codes'
 * offset, ~half their range, would scale it instead: 2-4x the error, measured). */
static void arrange_q8(const float *x, int k, int bits, int g, float *xa, float *xs) {
    float *d = xa;
    int8_t *q = (int8_t *)(xa + k / 32);
    for (int gi = 0; gi < k / g; gi++) xs[gi] = 0.f;
    for (int b = 0; b < k / 32; b++) {
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        d[b] = amax / 127.f;
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            int i = b * 32 + j, o = i & 63;
            int8_t v = (int8_t)lrintf(x[i] * inv);
            q[bits == 4 ? (i - o) + (o & 1) * 32 + (o >> 1) : i] = v;
            sum += v;
        }
        xs[b * 32 / g] += (float)sum * d[b];
    }
}

/* x laid out for matrix m's rows (float or int8), and its groups' float sums, which the biases multiply */
static void arrange_for(const fm_matrix *m, const float *x, float *xa, float *xs) {
    if (q8_path(m)) {
        arrange_q8(x, m->k, m->bits, m->group, xa, xs);
    } else {
        group_sums(x, m->k, m->group, xs);
        arrange(x, m->k, m->bits, xa);
    }
}

#if HAVE_Q8
/* the first popcount(some) of 16 fp16 or bf16 values as float32, the rest zero (a masked load: never past them) */
static inline __m512 halves_some(const uint16_t *p, __mmask16 some, int bf16) {
    __m256i h = _mm256_maskz_loadu_epi16(some, p);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

#define ROWS_DOT_Q8(R)                                                                                               \
static void rows_dot_q8_##R(const uint8_t *p, int64_t row_bytes, const uint16_t *scales, const uint16_t *biases,    \
                            int bf16, const float *xa, const float *xs, int k, int bits, int g, float *y) {          \
    const float *d = xa;                                                                                             \
    const int8_t *q = (const int8_t *)(xa + k / 32);                                                                 \
    int groups = k / g;                                                                                              \
    float sd[R][Q8_MAX_K / 32];  /* per 32 inputs: the codes' scale times the activations' */                       \
    for (int r = 0; r < R; r++)                                                                                      \
        if (g == 32) {  /* a scale per block: 16 at a time */                                                        \
            int b = 0;                                                                                               \
            for (; b + 16 <= groups; b += 16)                                                                        \
                _mm512_storeu_ps(&sd[r][b], _mm512_mul_ps(halves16(scales + (int64_t)r * groups + b, bf16),          \
                                                          _mm512_loadu_ps(d + b)));                                  \
            for (; b < groups; b++) sd[r][b] = half_at(scales, (int64_t)r * groups + b, bf16) * d[b];               \
        } else {  /* a scale per `per` blocks: 16 blocks at a time, each group's scale spread over its blocks */       \
            int per = g / 32, b = 0;                                                                                 \
            if (per <= 16) {                                                                                         \
                const __m512i spread = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,   \
                                                                          3, 2, 1, 0), __builtin_ctz(per));          \
                const __mmask16 some = (__mmask16)((1u << (16 / per)) - 1);                                          \
                for (; b + 16 <= k / 32; b += 16)                                                                    \
                    _mm512_storeu_ps(&sd[r][b], _mm512_mul_ps(_mm512_permutexvar_ps(spread, halves_some(             \
                        scales + (int64_t)r * groups + b / per, some, bf16)), _mm512_loadu_ps(d + b)));             \
            }                                                                                                        \
            for (; b < k / 32; b++) sd[r][b] = half_at(scales, (int64_t)r * groups + b / per, bf16) * d[b];         \
        }                                                                                                            \
    /* which 32-input block (of the two a step covers) each lane's four products belong to */                        \
    const __m512i idx = bits == 4 ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)                 \
                                  : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);                \
    const __m256i low4 = _mm256_set1_epi8(0x0f);                                                                     \
    __m512 acc[R];                                                                                                   \
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                                        \
    for (int c = 0; c < k; c += 64) {                                                                                \
        __m512i xv = _mm512_loadu_si512(q + c);                                                                      \
        for (int r = 0; r < R; r++) {                                                                                \
            __m512i w;                                                                                               \
            __builtin_prefetch(p + (r + R) * row_bytes + (bits == 4 ? c / 2 : c), 0, 2);  /* NEXT_ROWS */            \
            if (bits == 4) {                                                                                         \
                __m256i b = _mm256_loadu_si256((const __m256i *)(p + r * row_bytes + c / 2));                        \
                w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)),                            \
                                       _mm256_and_si256(_mm256_srli_epi16(b, 4), low4), 1);                          \
            } else {                                                                                                 \
                w = _mm512_loadu_si512(p + r * row_bytes + c);                                                       \
            }                                                                                                        \
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);                                        \
            double pair;                                                                                             \
            memcpy(&pair, &sd[r][c / 32], sizeof pair);                                                              \
            __m512 s = _mm512_permutexvar_ps(idx, _mm512_castpd_ps(_mm512_set1_pd(pair)));                           \
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[r]);                                            \
        }                                                                                                            \
    }                                                                                                                \
    for (int r = 0; r < R; r++)                                                                                      \
        y[r] = _mm512_reduce_add_ps(acc[r]) + bias_dot(biases + (int64_t)r * groups, bf16, xs, groups);             \
}
ROWS_DOT_Q8(1)
ROWS_DOT_Q8(4)
#endif

/* Rows r0..r0+n of a matrix (base + its offsets) times an arranged vector: y[i * stride] for row r0 + i. */
static inline void matrix_rows(const fm_matrix *m, const uint8_t *base, int r0, int n, const float *xa,
                               const float *xs, float *y, int64_t stride) {
    int64_t row_bytes = (int64_t)m->k * m->bits / 8, groups = m->k / m->group;
    int q8 = q8_path(m);
    float out[4];
    for (int r = r0; r < r0 + n; ) {
        int four = r + 4 <= r0 + n;
        const uint8_t *p = base + m->packed + r * row_bytes;
        const uint16_t *s = (const uint16_t *)(base + m->scales) + r * groups;
        const uint16_t *b = (const uint16_t *)(base + m->biases) + r * groups;
#if HAVE_Q8
        if (q8 && four) rows_dot_q8_4(p, row_bytes, s, b, m->bf16, xa, xs, m->k, m->bits, m->group, out);
        else if (q8) rows_dot_q8_1(p, row_bytes, s, b, m->bf16, xa, xs, m->k, m->bits, m->group, out);
        else
#endif
        if (four) rows_dot4(p, row_bytes, s, b, m->bf16, xa, xs, m->k, m->bits, m->group, out);
        else rows_dot1(p, row_bytes, s, b, m->bf16, xa, xs, m->k, m->bits, m->group, out);
        (void)q8;
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
    for (int i = 0; i < t; i++) arrange_for(w, x + (int64_t)i * w->k, xa + (int64_t)i * w->k, xs + (int64_t)i * groups);
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
    for (int i = 0; i < t; i++)
        arrange_for(gate_up, x + (int64_t)i * hidden, xa + (int64_t)i * hidden, xs + (int64_t)i * (hidden / g));
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
            arrange_for(down, act, aa + (int64_t)p * inter, as + (int64_t)p * act_groups);
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

/* fm_moe on a thread of the library's own, for a caller that must not wait (cpu_share.py: a GPU stream waits instead,
 * on done[0]): fm_moe_post copies the call and returns; the worker runs it, then stores its nanoseconds in done[1]
 * and `job` in done[0] (release: out is written before either). One job at a time: a post waits for the last one to
 * be taken. Returns -1 when the call has more pairs than a post holds. No Python runs on the worker. */
#define POST_MAX 64
typedef struct {
    fm_matrix gate_up, down;
    int n_experts, t, accumulate, threads;
    int64_t experts[POST_MAX];
    int32_t first[POST_MAX + 1], token[POST_MAX];
    float weight[POST_MAX], limit, alpha;
    const float *x;
    float *out, *xa, *xs, *h, *aa, *as;
    int64_t *done, job;
} fm_posted;

static fm_posted posted;
static int posted_ready, worker_started;
static pthread_mutex_t post_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t post_cv = PTHREAD_COND_INITIALIZER;

static void *post_worker(void *unused) {
    (void)unused;
    for (;;) {
        pthread_mutex_lock(&post_mu);
        while (!posted_ready)
            pthread_cond_wait(&post_cv, &post_mu);
        fm_posted p = posted;
        posted_ready = 0;
        pthread_cond_broadcast(&post_cv);
        pthread_mutex_unlock(&post_mu);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        fm_moe(&p.gate_up, &p.down, p.n_experts, p.experts, p.first, p.token, p.weight, p.t, p.x, p.limit, p.alpha,
               p.out, p.accumulate, p.xa, p.xs, p.h, p.aa, p.as, p.threads);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        __atomic_store_n(&p.done[1], (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec),
                         __ATOMIC_RELEASE);
        __atomic_store_n(&p.done[0], p.job, __ATOMIC_RELEASE);
    }
    return NULL;
}

int fm_moe_post(const fm_matrix *gate_up, const fm_matrix *down, int n_experts, const int64_t *experts,
                const int32_t *first, const int32_t *token, const float *weight, int t, const float *x,
                float limit, float alpha, float *out, int accumulate, float *xa, float *xs, float *h, float *aa,
                float *as, int threads, int64_t *done, int64_t job) {
    int pairs = first[n_experts];
    if (n_experts > POST_MAX || pairs > POST_MAX)
        return -1;
    pthread_mutex_lock(&post_mu);
    if (!worker_started) {
        pthread_t worker;
        if (pthread_create(&worker, NULL, post_worker, NULL) != 0) {
            pthread_mutex_unlock(&post_mu);
            return -2;
        }
        pthread_detach(worker);
        worker_started = 1;
    }
    while (posted_ready)
        pthread_cond_wait(&post_cv, &post_mu);
    fm_posted p = {*gate_up, *down, n_experts, t, accumulate, threads};
    memcpy(p.experts, experts, sizeof(int64_t) * n_experts);
    memcpy(p.first, first, sizeof(int32_t) * (n_experts + 1));
    memcpy(p.token, token, sizeof(int32_t) * pairs);
    memcpy(p.weight, weight, sizeof(float) * pairs);
    p.limit = limit, p.alpha = alpha, p.x = x, p.out = out, p.xa = xa, p.xs = xs, p.h = h, p.aa = aa, p.as = as;
    p.done = done, p.job = job;
    posted = p;
    posted_ready = 1;
    pthread_cond_broadcast(&post_cv);
    pthread_mutex_unlock(&post_mu);
    return 0;
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

/* float32 -> bf16, rounded to nearest even (torch's .to(torch.bfloat16); no NaNs here) */
static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    return (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
}

/* Matrix m (at base) dequantized to bf16, row-major [n, k]: w = code * scale + bias per group, as quant.py's
 * dequantize computes it in float32, then rounded. For prompts: a bf16 matrix product on many tokens runs on the
 * CPU's matrix units (AMX, through oneDNN) at several times our vector kernel's rate. */
__attribute__((optimize("fp-contract=off")))  /* code * scale, rounded, then + bias: as torch does it */
void fm_dequant_bf16(const fm_matrix *m, const uint8_t *base, uint16_t *out, int threads) {
    int k = m->k, g = m->group, groups = k / g, bits = m->bits;
    int64_t row_bytes = (int64_t)k * bits / 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < m->n; r++) {
        const uint8_t *p = base + m->packed + r * row_bytes;
        const uint16_t *sc = (const uint16_t *)(base + m->scales) + (int64_t)r * groups;
        const uint16_t *bi = (const uint16_t *)(base + m->biases) + (int64_t)r * groups;
        uint16_t *o = out + (int64_t)r * k;
        for (int gi = 0; gi < groups; gi++) {
            float s = half_at(sc, gi, m->bf16), b = half_at(bi, gi, m->bf16);
            int i = gi * g;
#ifdef __AVX512F__  /* 16 codes a step at 8 bits, 32 at 4 (a byte's low nibble, then its high one, in one word) */
            const __m512 vs = _mm512_set1_ps(s), vb = _mm512_set1_ps(b);
            const __m512i half_ulp = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
#define ROUNDED(w) _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(_mm512_castps_si512(w), half_ulp), \
                                     _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(w), 16), one)), 16)
#define DEQ(codes) _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(codes), vs), vb)
            if (bits == 8)
                for (; i + 16 <= (gi + 1) * g; i += 16) {
                    __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + i)));
                    _mm256_storeu_si256((__m256i *)(o + i), _mm512_cvtepi32_epi16(ROUNDED(DEQ(codes))));
                }
            else if (bits == 4)
                for (; i + 32 <= (gi + 1) * g; i += 32) {
                    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + i / 2)));
                    __m512i lo = ROUNDED(DEQ(_mm512_and_si512(bytes, _mm512_set1_epi32(15))));
                    __m512i hi = ROUNDED(DEQ(_mm512_srli_epi32(bytes, 4)));
                    _mm512_storeu_si512(o + i, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
                }
#undef DEQ
#undef ROUNDED
#endif
            for (; i < (gi + 1) * g; i++) {
                int code = bits == 8 ? p[i] : bits == 4 ? (p[i >> 1] >> ((i & 1) * 4)) & 15 : (p[i >> 2] >> ((i & 3) * 2)) & 3;
                o[i] = to_bf16((float)code * s + b);
            }
        }
    }
}

/* Whether this build multiplies int8 activations (AVX-512 VNNI), for reports and tests. */
int fm_has_q8(void) { return HAVE_Q8; }

/* ---- the small ops around a layer, one call each instead of 5-10 torch ops ---------------------------------- */

/* RMSNorm of rows of x (+ residual, whose sum is written to total), times (1 + weight) if zero_centred else weight,
 * times silu(gate) if given: kernels/fused.py's reference_rms_norm. */
void fm_rms_norm(int rows, int d, const float *x, const float *residual, const float *gate, const float *weight,
                 int zero_centred, float eps, float *y, float *total, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 8)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * d;
        float *yr = y + (int64_t)r * d, ss = 0.f;
        if (residual) {
            float *tr = total + (int64_t)r * d;
            const float *rr = residual + (int64_t)r * d;
            for (int i = 0; i < d; i++) {
                tr[i] = xr[i] + rr[i];
                ss += tr[i] * tr[i];
            }
            xr = tr;
        } else {
            for (int i = 0; i < d; i++) ss += xr[i] * xr[i];
        }
        float inv = 1.f / sqrtf(ss / d + eps);
        for (int i = 0; i < d; i++) {
            float v = xr[i] * inv * (zero_centred ? 1.f + weight[i] : weight[i]);
            if (gate) {
                float gv = gate[(int64_t)r * d + i];
                v *= gv / (1.f + expf(-gv));
            }
            yr[i] = v;
        }
    }
}

/* One token through the causal depthwise conv: out[c] = silu(sum_j window[c, j] w[c, j]) over [state[c], mixed[c]];
 * the state ([C, kernel - 1], oldest first) shifts in place: kernels/fused.py's reference_conv_step. */
void fm_conv_step(int channels, int kernel, const float *mixed, float *state, const float *weight, float *out) {
    for (int c = 0; c < channels; c++) {
        float *s = state + (int64_t)c * (kernel - 1), acc = mixed[c] * weight[(int64_t)c * kernel + kernel - 1];
        for (int j = 0; j < kernel - 1; j++) acc += s[j] * weight[(int64_t)c * kernel + j];
        for (int j = 0; j + 1 < kernel - 1; j++) s[j] = s[j + 1];
        if (kernel > 1) s[kernel - 2] = mixed[c];
        out[c] = acc / (1.f + expf(-acc));
    }
}

/* DeltaNet's gates: g = -exp(A_log) softplus(a + dt_bias) (softplus as torch's: x above 20 stays x), beta =
 * sigmoid(b); n = tokens x heads, a_log and dt_bias per head. */
void fm_delta_gates(int n, int heads, const float *a, const float *b, const float *a_log, const float *dt_bias,
                    float *g, float *beta) {
    for (int i = 0; i < n; i++) {
        float x = a[i] + dt_bias[i % heads];
        g[i] = -expf(a_log[i % heads]) * (x > 20.f ? x : log1pf(expf(x)));
        beta[i] = 1.f / (1.f + expf(-b[i]));
    }
}

/* Whether matrix m runs on int8 activations in this build (then it wins over a float GEMM up to many rows). */
int fm_q8_path(const fm_matrix *m) { return q8_path(m); }

/* The softmax router, kernels/fused.py's reference_route without slots: per row, the top max(top_k, default_k)
 * experts by probability, the first top_k kept and renormalised to 1 (normalize) or to the mass the default K had;
 * ids ascending, the weights in their order. */
void fm_route_softmax(int t, int e, const float *logits, int top_k, int default_k, int normalize, int64_t *ids,
                      float *weights) {
    int n = top_k > default_k ? top_k : default_k;
    for (int r = 0; r < t; r++) {
        const float *l = logits + (int64_t)r * e;
        float p[e], top[n], mx = l[0], sum = 0.f, mass = 0.f, kept = 0.f;
        int pick[n];
        for (int i = 1; i < e; i++) mx = l[i] > mx ? l[i] : mx;
        for (int i = 0; i < e; i++) sum += p[i] = expf(l[i] - mx);
        for (int j = 0; j < n; j++) {  /* n passes: n is a few, e a few hundred */
            int best = -1;
            for (int i = 0; i < e; i++)
                if (p[i] >= 0.f && (best < 0 || p[i] > p[best])) best = i;
            pick[j] = best;
            top[j] = p[best] / sum;
            p[best] = -1.f;
        }
        for (int j = 0; j < default_k; j++) mass += top[j];
        for (int j = 0; j < top_k; j++) kept += top[j];
        for (int j = 1; j < top_k; j++)  /* ascending ids, weights alongside */
            for (int i = j; i > 0 && pick[i - 1] > pick[i]; i--) {
                int a = pick[i]; pick[i] = pick[i - 1]; pick[i - 1] = a;
                float b = top[i]; top[i] = top[i - 1]; top[i - 1] = b;
            }
        for (int j = 0; j < top_k; j++) {
            ids[(int64_t)r * top_k + j] = pick[j];
            weights[(int64_t)r * top_k + j] = top[j] / kept * (normalize ? 1.f : mass);
        }
    }
}

/* An attention layer's queries and keys from its fused projection rows (stride proj_stride floats): each head
 * RMS-normed over head_dim (qk_norm 0 none, 1 plain weights, 2 zero-centred: 1 + w), then rotated over its first
 * 2 n_freq dims by position x inv_freq (NeoX halves: i pairs with i + n_freq); gated: a query head is followed by its
 * gate (2 hd wide), else queries are heads x hd. q [T, heads, hd], k [T, kv, hd]: kernels/fused.py's
 * reference_qk_norm_rope. */
void fm_qk_norm_rope(int t, const float *proj, int64_t proj_stride, const int64_t *positions, const float *q_norm,
                     const float *k_norm, const float *inv_freq, int n_freq, int heads, int kv_heads, int head_dim,
                     float eps, int gated, int qk_norm, float *q, float *k) {
    int q_width = (gated ? 2 : 1) * head_dim;
    float cs[256], sn[256];
    for (int r = 0; r < t; r++) {
        for (int i = 0; i < n_freq && i < 256; i++) {
            float angle = (float)positions[r] * inv_freq[i];
            cs[i] = cosf(angle);
            sn[i] = sinf(angle);
        }
        for (int h = 0; h < heads + kv_heads; h++) {
            int is_q = h < heads;
            const float *x = proj + (int64_t)r * proj_stride
                             + (is_q ? (int64_t)h * q_width : (int64_t)heads * q_width + (int64_t)(h - heads) * head_dim);
            float *y = is_q ? q + ((int64_t)r * heads + h) * head_dim : k + ((int64_t)r * kv_heads + h - heads) * head_dim;
            const float *w = is_q ? q_norm : k_norm;
            float inv = 1.f;
            if (qk_norm) {
                float ss = 0.f;
                for (int i = 0; i < head_dim; i++) ss += x[i] * x[i];
                inv = 1.f / sqrtf(ss / head_dim + eps);
            }
            for (int i = 0; i < head_dim; i++)
                y[i] = qk_norm ? x[i] * inv * (qk_norm == 2 ? 1.f + w[i] : w[i]) : x[i];
            for (int i = 0; i < n_freq; i++) {
                float a = y[i], b = y[i + n_freq];
                y[i] = a * cs[i] - b * sn[i];
                y[i + n_freq] = b * cs[i] + a * sn[i];
            }
        }
    }
}

/* One decode token through a Gated DeltaNet layer between its two projections, in one call: from the input
 * projection's row [mixed (q | k | v) | z | b | a] the causal conv (state shifted in place), the gates, the delta
 * rule (state updated in place) and the output's gated RMSNorm (plain weights): out [hv * dv], what the output
 * projection reads. The same four functions the separate calls run, in the same order (models/qwen3_next.py). */
void fm_delta_decode(int hk, int hv, int dk, int dv, int kernel, const float *proj, float *conv_state,
                     const float *conv_weight, const float *a_log, const float *dt_bias, float *state,
                     const float *norm_weight, float eps, float *scratch, float *out, int threads) {
    int channels = 2 * hk * dk + hv * dv;
    const float *z = proj + channels, *b = z + (int64_t)hv * dv, *a = b + hv;
    float *mixed = scratch, *g = scratch + channels, *beta = g + hv, *core = beta + hv;
    fm_conv_step(channels, kernel, proj, conv_state, conv_weight, mixed);
    fm_delta_gates(hv, hv, a, b, a_log, dt_bias, g, beta);
    fm_gated_delta_step(hk, hv, dk, dv, mixed, mixed + hk * dk, mixed + 2 * hk * dk, g, beta, state, core, threads);
    fm_rms_norm(hv, dv, core, 0, z, norm_weight, 0, eps, out, 0, threads);
}

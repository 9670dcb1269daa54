/* The tiled accumulator of qcompile.tiled over a matmul, fused: each tile's partial sums stay in
 * registers and go into the accumulator at the tile's end; none is stored (the semantics are in that
 * module's docstring; this is its CPU kernel for the plans float32 keeps exact).
 *
 * The operands are read through offset tables, so a conv's im2col matrix, a transposed or strided
 * matrix and a flipped kernel are all read in place. For group g < groups, i < M, k < K (K >= 1), j < N:
 *
 *   A[g, i, k] = a.base[a.group[g] + a.row[i] + a.col[k]]      rows of the reduction, in its order
 *   B[g, k, j] = b.base[b.group[g] + b.row[k] + b.col[j]]
 *   where a multiplier operand is given (am.base / bm.base non-NULL, tables like the operand's), the
 *   element is rint(A[g, i, k] * am[g, i, k]) (float32 product, rounded half to even; so B): real
 *   values on a grid read as its integer codes, x * (1 / scale), without a copy of the codes
 *   start      = s.base[s.group[g] + s.row[i] + s.col[j]]      (s.base NULL: 0)
 *   output o   = out.group[g] + out.row[i] + out.col[j]   (out.base is not read):
 *     acc[o]         for each tile t (tile products k in [t*tile, (t+1)*tile), the last one shorter),
 *                    in order, from the start, with p_t = Σ_tile A[g,i,k] B[g,k,j]:
 *                      QC_SATURATE  acc <- clamp(acc + p_t, lo, hi)
 *                      QC_PAIRWISE  acc <- clamp(acc + clamp(p_t, lo, hi), lo, hi)   (tile 2)
 *                      QC_WRAP      acc <- acc + p_t wrapped into [lo, hi] (two's complement; wrapping
 *                                   is modular, so the tile is any length that keeps the sums exact)
 *     overflowed[o]  (overflowed non-NULL) saturation: 1 where a clamp changed a value (an event); wrap:
 *                    1 where the result differs from the exact sum (the wraps did not cancel); else 0
 *     exact[o]       (exact non-NULL) start + every tile's partial sum p_t
 *   acc[o] is written times om[g, i, j] where an output multiplier is given (om.base non-NULL, tables
 *   like the output's): the result in real units, in the same pass
 *
 * counts[0] <- the number of events (wrap: of outputs that differ), counts[1] <- the number of
 * outputs that overflowed. Returns 0, or -1 when scratch memory could not be allocated (nothing
 * written then is meaningful). Exact whenever every tile's Σ|products| and
 * |acc| + |partial| stay below 2^24, or the value is clamped anyway (wrap: |p_t|, |start| < 2^22
 * and hi - lo < 2^23) -- the caller's plan guarantees it: integers below 2^24 add and multiply
 * exactly in float, in any order, so fused multiply-adds change nothing.
 *
 * Layout (the usual GEMM blocking): A is packed once into panels of QC_MR rows; for each block of
 * columns, the reduction runs in blocks of whole tiles (about QC_KC products), each packing its
 * slice of B into panels of QC_NR columns; a QC_MR x QC_NR block of partial sums lives in vector
 * registers for one tile. The accumulators of a column block stay in a scratch block (in cache)
 * until its reduction ends, and are then written through the output table. When the work is large,
 * column blocks (at least four a thread) and A's panels run on the OpenMP threads (torch's own pool,
 * as in clamp_scan.c).
 */
#ifndef QC_MR                         /* the first pass: what every register block shape shares */
#define _POSIX_C_SOURCE 200112L     /* posix_memalign */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#define QC_VL 16
#elif defined(__AVX__)
#define QC_VL 8
#else
#define QC_VL 4
#endif
#define QC_KC 256                     /* products per reduction block, rounded down to whole tiles */
#define QC_B_FLOATS (1 << 16)         /* packed B per block (256 KiB): sets a column block's width */

enum { QC_SATURATE, QC_WRAP, QC_PAIRWISE };       /* overflow modes, in accumulator.OVERFLOW_MODES' order */
enum { QC_CONTINUE, QC_FRESH, QC_FRESH_ZERO };     /* qc_micro's `fresh` */

typedef float qc_vf __attribute__((vector_size(QC_VL * 4)));
typedef int32_t qc_vi __attribute__((vector_size(QC_VL * 4)));

typedef struct {
    const float *base;
    const int64_t *group, *row, *col;
} qc_operand;

static int64_t qc_roundup(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

/* The calling thread's scratch buffer `slot` (QC_SLOTS of them), at least `floats` floats, 64-byte aligned,
 * or NULL when it cannot grow. Each thread keeps its buffers from call to call (they grow to the largest
 * call's needs and are never freed): fresh multi-megabyte blocks would pay their page faults on every
 * call. */
enum { QC_SLOT_A, QC_SLOT_B, QC_SLOT_C, QC_SLOT_E, QC_SLOT_H, QC_SLOTS };
static __thread struct { void *p; int64_t floats; } qc_scratch_buf[QC_SLOTS];

static void *qc_scratch(int slot, int64_t floats)
{
    floats = qc_roundup(floats > 0 ? floats : 1, 16);
    if (qc_scratch_buf[slot].floats < floats) {
        void *p = NULL;
        free(qc_scratch_buf[slot].p);
        qc_scratch_buf[slot].p = NULL;
        qc_scratch_buf[slot].floats = 0;
        if (posix_memalign(&p, 64, (size_t)floats * 4))
            return NULL;
        qc_scratch_buf[slot].p = p;
        qc_scratch_buf[slot].floats = floats;
    }
    return qc_scratch_buf[slot].p;
}

/* x rounded to the nearest integer, ties to even (the default rounding mode; one instruction from SSE4.1 on) */
static inline float qc_rint(float x)
{
    return __builtin_rintf(x);
}

/* max(lo, min(s, hi)), lanewise */
static inline qc_vf qc_clamp(qc_vf s, qc_vf lo, qc_vf hi)
{
#if defined(__AVX512F__)
    return _mm512_max_ps(lo, _mm512_min_ps(s, hi));
#elif defined(__AVX__)
    return _mm256_max_ps(lo, _mm256_min_ps(s, hi));
#else
    const qc_vi below = s < lo, above = s > hi;
    return (qc_vf)(((qc_vi)s & ~(below | above)) | ((qc_vi)lo & below) | ((qc_vi)hi & above));
#endif
}

/* floor(s), lanewise */
static inline qc_vf qc_floor(qc_vf s)
{
#if defined(__AVX512F__)
    return _mm512_roundscale_ps(s, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#elif defined(__AVX__)
    return _mm256_floor_ps(s);
#else
    const qc_vf t = __builtin_convertvector(__builtin_convertvector(s, qc_vi), qc_vf);   /* toward zero */
    return t + __builtin_convertvector(s < t, qc_vf);                                    /* -1 where s < t */
#endif
}

/* The OpenMP threads a parallel region gets (1 without OpenMP). */
static int64_t qc_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* n results out of a scratch block, to outputs j (delta NULL: adjacent) or delta[j]: accumulators (times
 * scale[j] where scale is not NULL), overflow flags (any event; wrap: net wraps; overflowed NULL: none),
 * exact sums (exact NULL: none); adds their events (wrap: outputs with net wraps) to counts[0] and the outputs that overflowed
 * to counts[1]. */
static void qc_store(int64_t n, const float *cb, const int32_t *hb, const float *eb, float *acc,
                     uint8_t *overflowed, float *exact, const int32_t *delta, const float *scale, int mode,
                     int64_t *counts)
{
    int64_t events = 0, hit = 0;
    if (delta) {
        for (int64_t j = 0; j < n; ++j) {
            acc[delta[j]] = scale ? cb[j] * scale[j] : cb[j];
            if (overflowed)
                overflowed[delta[j]] = hb[j] != 0;
            hit += hb[j] != 0;
            events += hb[j];
        }
        for (int64_t j = 0; exact && j < n; ++j)
            exact[delta[j]] = eb[j];
    } else {
        for (int64_t j = 0; j < n; ++j) {
            acc[j] = scale ? cb[j] * scale[j] : cb[j];
            if (overflowed)
                overflowed[j] = hb[j] != 0;
            hit += hb[j] != 0;
            events += hb[j];
        }
        if (exact)
            memcpy(exact, eb, (size_t)n * sizeof(float));
    }
    counts[0] += mode == QC_WRAP ? hit : events;
    counts[1] += hit;
}

#if defined(__AVX512F__)                  /* the most runs per vector read with masked loads */
#define QC_RUNS 3
#elif defined(__AVX2__)
#define QC_RUNS 4                     /* a 3 x 3 kernel's taps, (c, ky, kx): 3 adjacent, then the next row's */
#endif
#if defined(__AVX512F__)
typedef __mmask16 qc_lanes;           /* a set of lanes, as the masked loads take it */
static qc_lanes qc_lane_set(unsigned bits) { return (__mmask16)bits; }
#elif defined(__AVX2__)
typedef __m256i qc_lanes;             /* all ones in the lanes of the set */
static qc_lanes qc_lane_set(unsigned bits)
{
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), bit), bit);
}
#endif

/* The register block shapes: QC_MR rows x QC_NV vectors of partial sums (AVX-512: 14 x 2 or 8 x 3, 28 or 24
 * of its 32 registers; AVX: 6 x 2 or 4 x 3, 12 of 16; SSE: 6 x 2). Each shape's kernel is this file's second
 * pass, its names suffixed; the second shape (QC_MR2 x QC_NV2) leaves no rows of padding for 64 and 128
 * channels, which the first pads (AVX-512: 9%, AVX: 3%). */
#if defined(__AVX512F__)
#define QC_MR1 14
#define QC_MR2 8
#elif defined(__AVX__)
#define QC_MR1 6
#define QC_MR2 4
#else
#define QC_MR1 6
#endif
#define QC_NV1 2
#define QC_NV2 3
#define QC_MR QC_MR1
#define QC_NV QC_NV1
#define QC_SHAPE(name) name##_first
#include "tiled_gemm.c"               /* this file, its second pass */
#undef QC_MR
#undef QC_NV
#undef QC_SHAPE
#ifdef QC_MR2
#define QC_MR QC_MR2
#define QC_NV QC_NV2
#define QC_SHAPE(name) name##_second
#include "tiled_gemm.c"
#undef QC_MR
#undef QC_NV
#undef QC_SHAPE
#endif

/* The register block shapes (rows, columns) of this build: shapes[0] <- their number, then the pairs;
 * the caller picks a shape and orients the product to waste the least padding. */
void qc_tiled_gemm_shapes(int64_t *shapes)
{
    shapes[0] = 1;
    shapes[1] = QC_MR1, shapes[2] = QC_NV1 * QC_VL;
#ifdef QC_MR2
    shapes[0] = 2;
    shapes[3] = QC_MR2, shapes[4] = QC_NV2 * QC_VL;
#endif
}

/* The tiled GEMM with register block shape `shape` (an index into qc_tiled_gemm_shapes). */
int qc_tiled_gemm_f32(int shape, int64_t groups, int64_t M, int64_t N, int64_t K, int64_t tl, const qc_operand *a,
                      const qc_operand *b, const qc_operand *am, const qc_operand *bm, const qc_operand *start,
                      const qc_operand *out, const qc_operand *om, float *acc, float *exact, uint8_t *overflowed,
                      float lo, float hi, int mode, int64_t *counts)
{
#ifdef QC_MR2
    if (shape == 1)
        return qc_gemm_second(groups, M, N, K, tl, a, b, am, bm, start, out, om, acc, exact, overflowed, lo, hi, mode,
                              counts);
#else
    (void)shape;
#endif
    return qc_gemm_first(groups, M, N, K, tl, a, b, am, bm, start, out, om, acc, exact, overflowed, lo, hi, mode,
                         counts);
}

#else                                 /* the second pass: one register block shape (QC_MR, QC_NV, QC_SHAPE) */
#define QC_NR (QC_NV * QC_VL)         /* columns of a register block */
#define QC_MAX_PANELS (QC_B_FLOATS / (QC_KC / 2) / QC_NR + 1)   /* panels of a column block: see nc in qc_gemm */

/* One QC_MR x QC_NR block over kc products packed in ap (kc x QC_MR) and bp (kc x QC_NR), tile by tile
 * (tiles of tl products from the block's start, the last one shorter), in `mode`. acc, hits, exact:
 * the block's rows, ld elements apart; hits counts the clamps that changed a value (wrap: the net
 * number of wraps). fresh: the first tile of the reduction, whose hits and exact sums are not set yet
 * (QC_FRESH: they start at 0 and the accumulators at acc; QC_FRESH_ZERO: the accumulators at 0 too,
 * acc not set either). */
__attribute__((optimize("fp-contract=fast")))
static void QC_SHAPE(qc_micro)(int64_t kc, int64_t tl, const float *ap, const float *bp, float *acc, int32_t *hits,
                     float *exact, int64_t ld, float lo, float hi, int mode, int fresh)
{
    const qc_vf lov = lo - (qc_vf){0}, hiv = hi - (qc_vf){0};    /* x - (+0) is x: a broadcast */
    const qc_vf span = (hi - lo + 1.0f) - (qc_vf){0}, inv = 1.0f / (hi - lo + 1.0f) - (qc_vf){0};   /* 2^b, 2^-b */
    for (int64_t k0 = 0; k0 < kc; k0 += tl) {
        const int64_t n = kc - k0 < tl ? kc - k0 : tl;
        const int init = k0 == 0 ? fresh : 0;
        qc_vf p[QC_MR][QC_NV];
#pragma GCC unroll 16
        for (int r = 0; r < QC_MR; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < QC_NV; ++v)
                p[r][v] = (qc_vf){0};
#pragma GCC unroll 8
        for (int64_t k = 0; k < n; ++k) {
            qc_vf b[QC_NV];
#pragma GCC unroll 4
            for (int v = 0; v < QC_NV; ++v)
                memcpy(&b[v], bp + v * QC_VL, sizeof b[v]);
#pragma GCC unroll 16
            for (int r = 0; r < QC_MR; ++r) {
                const qc_vf a = ap[r] - (qc_vf){0};
#pragma GCC unroll 4
                for (int v = 0; v < QC_NV; ++v)
                    p[r][v] += a * b[v];
            }
            ap += QC_MR;
            bp += QC_NR;
        }
#pragma GCC unroll 16
        for (int r = 0; r < QC_MR; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < QC_NV; ++v) {
                qc_vf *c = (qc_vf *)(acc + r * ld + v * QC_VL), *e = (qc_vf *)(exact + r * ld + v * QC_VL);
                qc_vi *h = (qc_vi *)(hits + r * ld + v * QC_VL);
                const qc_vf c0 = init == QC_FRESH_ZERO ? (qc_vf){0} : *c;
                qc_vi h0 = init ? (qc_vi){0} : *h;
                if (exact)
                    *e = (init ? c0 : *e) + p[r][v];
                if (mode == QC_WRAP) {
                    const qc_vf s = c0 + p[r][v], k = qc_floor((s - lov) * inv);
                    *c = s - k * span;
                    *h = h0 + __builtin_convertvector(k, qc_vi);
                } else {
                    qc_vf q = p[r][v];
                    if (mode == QC_PAIRWISE) {
                        q = qc_clamp(q, lov, hiv);
                        h0 -= (qc_vi)(q != p[r][v]);
                    }
                    const qc_vf s = c0 + q, clamped = qc_clamp(s, lov, hiv);
                    *c = clamped;
                    *h = h0 - (qc_vi)(s != clamped);
                }
            }
    }
}

/* Columns in panel jp of a block of n columns. */
static int64_t QC_SHAPE(qc_panel_width)(int64_t n, int64_t jp)
{
    return n - jp * QC_NR < QC_NR ? n - jp * QC_NR : QC_NR;
}

/* A panel of m <= QC_NR columns at offsets col[0..m): delta[j] = col[j] - col[0] (0 past m, so a panel
 * read through delta reads a valid element for the columns it does not have). Returns whether the
 * panel is QC_NR columns adjacent in memory. Offsets within one tensor: the caller keeps them below
 * 2^31. */
static int QC_SHAPE(qc_panel)(const int64_t *col, int64_t m, int32_t *delta)
{
    int adjacent = m == QC_NR;
    for (int64_t j = 0; j < QC_NR; ++j) {
        delta[j] = j < m ? (int32_t)(col[j] - col[0]) : 0;
        adjacent &= delta[j] == j;
    }
    return adjacent;
}

#ifdef QC_RUNS

/* A panel's columns as runs of evenly spaced elements, 1 or 2 apart (a row of a conv's input at stride 1
 * or 2): in vector v, the lanes of run r (mask[v][r]) read src + off[v][r] + step·lane; a run 2 apart
 * reads the 2·QC_VL elements from off (lo / hi: those its lanes need) and keeps the even ones. Lanes past
 * the panel's m columns belong to no run. */
typedef struct {
    int n[QC_NV];
    int32_t off[QC_NV][QC_RUNS];
    int step[QC_NV][QC_RUNS];
    qc_lanes mask[QC_NV][QC_RUNS], lo[QC_NV][QC_RUNS], hi[QC_NV][QC_RUNS];
} QC_SHAPE(qc_runs);

/* The runs of a panel of m columns at deltas delta; 0 when some vector has more than QC_RUNS. */
static int QC_SHAPE(qc_make_runs)(const int32_t *delta, int64_t m, QC_SHAPE(qc_runs) *runs)
{
    for (int v = 0; v < QC_NV; ++v) {
        int n = 0;
        for (int t = 0; t < QC_VL && v * QC_VL + t < m;) {
            const int j = v * QC_VL + t;
            const int32_t next = t + 1 < QC_VL && j + 1 < m ? delta[j + 1] - delta[j] : 1;
            const int step = next == 2 ? 2 : 1;
            unsigned mask = 0, lo = 0, hi = 0;
            if (n == QC_RUNS)
                return 0;
            runs->off[v][n] = delta[j] - step * t;
            runs->step[v][n] = step;
            do {
                mask |= 1u << t;
                if (step * t < QC_VL)
                    lo |= 1u << (step * t);
                else
                    hi |= 1u << (step * t - QC_VL);
                ++t;
            } while (t < QC_VL && v * QC_VL + t < m && delta[v * QC_VL + t] == delta[v * QC_VL + t - 1] + step);
            runs->mask[v][n] = qc_lane_set(mask);
            runs->lo[v][n] = qc_lane_set(lo);
            runs->hi[v][n] = qc_lane_set(hi);
            ++n;
        }
        runs->n[v] = n;
    }
    return 1;
}

/* dst[j] = src[delta[j]] for the QC_NR columns of a panel, through its runs (0 past its columns). Masked
 * lanes are not read: no fault past the tensor. */
static void QC_SHAPE(qc_load_runs)(float *dst, const float *src, const QC_SHAPE(qc_runs) *runs)
{
#if defined(__AVX512F__)
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (int v = 0; v < QC_NV; ++v) {
        __m512 x = _mm512_setzero_ps();
        for (int r = 0; r < runs->n[v]; ++r) {
            const float *at = src + runs->off[v][r];
            if (runs->step[v][r] == 1)
                x = _mm512_mask_loadu_ps(x, runs->mask[v][r], at);
            else
                x = _mm512_mask_mov_ps(x, runs->mask[v][r], _mm512_permutex2var_ps(
                    _mm512_maskz_loadu_ps(runs->lo[v][r], at), even, _mm512_maskz_loadu_ps(runs->hi[v][r], at + QC_VL)));
        }
        _mm512_store_ps(dst + v * QC_VL, x);
    }
#else                                 /* AVX2: a masked load zeroes the lanes it does not read */
    for (int v = 0; v < QC_NV; ++v) {
        __m256 x = _mm256_setzero_ps();
        for (int r = 0; r < runs->n[v]; ++r) {
            const float *at = src + runs->off[v][r];
            if (runs->step[v][r] == 1)
                x = _mm256_or_ps(x, _mm256_maskload_ps(at, runs->mask[v][r]));
            else {                    /* elements 0 2 4 6 of lo, then of hi: lane t holds element 2t */
                const __m256 pairs = _mm256_shuffle_ps(_mm256_maskload_ps(at, runs->lo[v][r]),
                                                       _mm256_maskload_ps(at + QC_VL, runs->hi[v][r]), 0x88);
                x = _mm256_or_ps(x, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), 0xD8)));
            }
        }
        _mm256_store_ps(dst + v * QC_VL, x);
    }
#endif
}
#endif

/* dst[j] = src[delta[j]] for the QC_NR columns of a panel */
static void QC_SHAPE(qc_gather)(float *dst, const float *src, const int32_t *delta)
{
#if defined(__AVX512F__)
    for (int j = 0; j < QC_NR; j += 16)
        _mm512_store_ps(dst + j, _mm512_i32gather_ps(_mm512_loadu_si512(delta + j), src, 4));
#elif defined(__AVX2__)
    for (int j = 0; j < QC_NR; j += 8)
        _mm256_store_ps(dst + j, _mm256_i32gather_ps(src, _mm256_loadu_si256((const __m256i *)(delta + j)), 4));
#else
    for (int j = 0; j < QC_NR; ++j)
        dst[j] = src[delta[j]];
#endif
}

/* A packed panel of A (K x QC_MR) times its multipliers, rounded (qc_rint): row r's multiplier at product k
 * is mul[r][mcol[k]] (mul[r] NULL: a padding row, left 0). per_row: mcol[k] is one value; per_col: the
 * rows' mul[r] are one pointer (then vector loops). */
static void QC_SHAPE(qc_round_panel)(float *dst, int64_t K, const float *const *mul, const int64_t *mcol, int per_row,
                           int per_col)
{
    if (per_row) {
        float m[QC_MR];
        for (int r = 0; r < QC_MR; ++r)
            m[r] = mul[r] ? mul[r][mcol[0]] : 0.0f;
        for (int64_t k = 0; k < K; ++k)
            for (int r = 0; r < QC_MR; ++r)
                dst[k * QC_MR + r] = qc_rint(dst[k * QC_MR + r] * m[r]);
    } else if (per_col) {                              /* padding rows hold 0: rint(0 * m) is 0 */
        for (int64_t k = 0; k < K; ++k) {
            const float m = mul[0][mcol[k]];
            for (int r = 0; r < QC_MR; ++r)
                dst[k * QC_MR + r] = qc_rint(dst[k * QC_MR + r] * m);
        }
    } else {
        for (int64_t k = 0; k < K; ++k)
            for (int r = 0; r < QC_MR; ++r)
                if (mul[r])
                    dst[k * QC_MR + r] = qc_rint(dst[k * QC_MR + r] * mul[r][mcol[k]]);
    }
}

static int QC_SHAPE(qc_gemm)(int64_t groups, int64_t M, int64_t N, int64_t K, int64_t tl, const qc_operand *a,
                      const qc_operand *b, const qc_operand *am, const qc_operand *bm, const qc_operand *start,
                      const qc_operand *out, const qc_operand *om, float *acc, float *exact, uint8_t *overflowed,
                      float lo, float hi, int mode, int64_t *counts)
{
    const int64_t Mp = qc_roundup(M, QC_MR), panels = Mp / QC_MR;
    const int64_t kc_max = tl >= QC_KC ? tl : QC_KC / tl * tl;
    const int parallel = groups * M * N * K >= (1 << 22);
    int64_t nc = QC_B_FLOATS / kc_max / QC_NR * QC_NR;
    if (parallel) {                 /* at least 4 column blocks a thread, so the threads' shares even out */
        const int64_t share = qc_roundup((N + 4 * qc_threads() - 1) / (4 * qc_threads()), QC_NR);
        nc = groups < 4 * qc_threads() && share < nc ? share : nc;
    }
    if (nc < QC_NR)
        nc = QC_NR;
    if (nc > qc_roundup(N, QC_NR))
        nc = qc_roundup(N, QC_NR);
    if (nc > QC_MAX_PANELS * QC_NR)   /* the per-panel arrays of the results' loop (never reached with QC_KC, QC_B_FLOATS) */
        nc = QC_MAX_PANELS * QC_NR;
    const int64_t jblocks = (N + nc - 1) / nc;

    float *ap = qc_scratch(QC_SLOT_A, groups * Mp * K);             /* [g][panel][k][r] */
    if (!ap)
        return -1;
    int m_per_row = 1, m_per_col = 1;                   /* A's multipliers: one per row / one per product */
    for (int64_t k = 1; am->base && k < K; ++k)
        m_per_row &= am->col[k] == am->col[0];
    for (int64_t i = 1; am->base && i < M; ++i)
        m_per_col &= am->row[i] == am->row[0];
#pragma omp parallel for collapse(2) schedule(static) if(parallel)
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t ip = 0; ip < panels; ++ip) {
            float *dst = ap + (g * panels + ip) * K * QC_MR;
            const float *src[QC_MR], *mul[QC_MR];
            for (int r = 0; r < QC_MR; ++r) {
                const int in = ip * QC_MR + r < M;
                src[r] = in ? a->base + a->group[g] + a->row[ip * QC_MR + r] : NULL;
                mul[r] = in && am->base ? am->base + am->group[g] + am->row[ip * QC_MR + r] : NULL;
            }
            for (int64_t k0 = 0; k0 < K; k0 += QC_KC) {      /* rounded while a block of the panel is in cache */
                const int64_t k1 = K - k0 < QC_KC ? K : k0 + QC_KC;
                for (int64_t k = k0; k < k1; ++k)
                    for (int r = 0; r < QC_MR; ++r)
                        dst[k * QC_MR + r] = src[r] ? src[r][a->col[k]] : 0.0f;
                if (am->base)
                    QC_SHAPE(qc_round_panel)(dst + k0 * QC_MR, k1 - k0, mul, am->col + k0, m_per_row, m_per_col);
            }
        }

    int64_t events = 0, hit = 0;
    int failed = 0;
#pragma omp parallel reduction(+:events, hit) if(parallel)
    {
        int64_t mine[2] = {0, 0};
        float *bp = qc_scratch(QC_SLOT_B, kc_max * nc), *cb = qc_scratch(QC_SLOT_C, Mp * nc);
        float *eb = exact ? qc_scratch(QC_SLOT_E, Mp * nc) : NULL;
        int32_t *hb = qc_scratch(QC_SLOT_H, Mp * nc);
        const int ok = bp && cb && hb && (eb || !exact);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t jb = 0; jb < jblocks; ++jb) {
                if (!ok)
                    continue;
                const int64_t j0 = jb * nc, n = N - j0 < nc ? N - j0 : nc, npanels = (n + QC_NR - 1) / QC_NR;
                int32_t delta[QC_NR];
                for (int64_t jp = 0; start->base && jp < npanels; ++jp) {     /* the accumulators start */
                    QC_SHAPE(qc_panel)(start->col + j0 + jp * QC_NR, QC_SHAPE(qc_panel_width)(n, jp), delta);
                    for (int64_t i = 0; i < Mp; ++i) {
                        float *c = cb + i * nc + jp * QC_NR;
                        const float *s = i < M ? start->base + start->group[g] + start->row[i]
                                                     + start->col[j0 + jp * QC_NR] : NULL;
                        for (int j = 0; j < QC_NR; ++j)
                            c[j] = s ? s[delta[j]] : 0.0f;
                    }
                }
                for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
                    const int64_t kc = K - k0 < kc_max ? K - k0 : kc_max;
                    for (int64_t jp = 0; jp < npanels; ++jp) {
                        /* the panel's slice of B, packed: row copies where its columns are adjacent in memory */
                        const int64_t *col = b->col + j0 + jp * QC_NR;
                        const float *src = b->base + b->group[g] + col[0];
                        const int64_t *brow = b->row + k0;
                        float *dst = bp + jp * kc * QC_NR;
#ifdef QC_RUNS
                        QC_SHAPE(qc_runs) runs;
#endif
                        if (QC_SHAPE(qc_panel)(col, QC_SHAPE(qc_panel_width)(n, jp), delta))
                            for (int64_t k = 0; k < kc; ++k)
                                memcpy(dst + k * QC_NR, src + brow[k], QC_NR * sizeof(float));
#ifdef QC_RUNS
                        else if (QC_SHAPE(qc_make_runs)(delta, QC_SHAPE(qc_panel_width)(n, jp), &runs))  /* rows shorter than a panel, stride 2 */
                            for (int64_t k = 0; k < kc; ++k)
                                QC_SHAPE(qc_load_runs)(dst + k * QC_NR, src + brow[k], &runs);
#endif
                        else
                            for (int64_t k = 0; k < kc; ++k)
                                QC_SHAPE(qc_gather)(dst + k * QC_NR, src + brow[k], delta);
                        if (bm->base) {     /* the codes of real values: the panel times its multipliers, rounded */
                            int32_t mdelta[QC_NR];
                            const int64_t *mcol = bm->col + j0 + jp * QC_NR, *mrow = bm->row + k0;
                            const float *mbase = bm->base + bm->group[g] + mcol[0];
                            QC_SHAPE(qc_panel)(mcol, QC_SHAPE(qc_panel_width)(n, jp), mdelta);
                            int same_rows = 1;                       /* one multiplier row for the block */
                            for (int64_t k = 1; k < kc; ++k)
                                same_rows &= mrow[k] == mrow[0];
                            float mv[QC_NR] = {0};
                            for (int64_t k = 0; k < kc; ++k) {
                                if (k == 0 || !same_rows)
                                    for (int j = 0; j < QC_NR; ++j)
                                        mv[j] = mbase[mrow[k] + mdelta[j]];
                                for (int j = 0; j < QC_NR; ++j)
                                    dst[k * QC_NR + j] = qc_rint(dst[k * QC_NR + j] * mv[j]);
                            }
                        }
                        for (int64_t ip = 0; ip < panels; ++ip) {
                            const int64_t at = ip * QC_MR * nc + jp * QC_NR;
                            QC_SHAPE(qc_micro)(kc, tl, ap + ((g * panels + ip) * K + k0) * QC_MR, dst, cb + at, hb + at,
                                     eb ? eb + at : NULL, nc, lo, hi, mode,
                                     k0 ? QC_CONTINUE : start->base ? QC_FRESH : QC_FRESH_ZERO);
                        }
                    }
                }
                /* the results, through the output table: row by row, so each row's outputs are written in order */
                int adjacent[QC_MAX_PANELS], s_constant[QC_MAX_PANELS];
                int32_t odelta[QC_MAX_PANELS][QC_NR], sdelta[QC_MAX_PANELS][QC_NR];
                for (int64_t jp = 0; jp < npanels; ++jp) {
                    const int64_t m = QC_SHAPE(qc_panel_width)(n, jp);
                    adjacent[jp] = QC_SHAPE(qc_panel)(out->col + j0 + jp * QC_NR, m, odelta[jp]);
                    s_constant[jp] = 1;
                    if (om->base) {
                        QC_SHAPE(qc_panel)(om->col + j0 + jp * QC_NR, m, sdelta[jp]);
                        for (int j = 0; j < QC_NR; ++j)
                            s_constant[jp] &= sdelta[jp][j] == 0;
                    }
                }
                for (int64_t i = 0; i < M; ++i)
                    for (int64_t jp = 0; jp < npanels; ++jp) {
                        const int64_t o = out->group[g] + out->row[i] + out->col[j0 + jp * QC_NR], at = i * nc + jp * QC_NR;
                        float sv[QC_NR];                             /* the outputs' multipliers */
                        if (om->base) {
                            const float *sr = om->base + om->group[g] + om->row[i] + om->col[j0 + jp * QC_NR];
                            for (int j = 0; j < QC_NR; ++j)
                                sv[j] = sr[s_constant[jp] ? 0 : sdelta[jp][j]];
                        }
                        qc_store(adjacent[jp] ? QC_NR : QC_SHAPE(qc_panel_width)(n, jp), cb + at, hb + at,
                                 eb ? eb + at : NULL, acc + o, overflowed ? overflowed + o : NULL,
                                 exact ? exact + o : NULL, adjacent[jp] ? NULL : odelta[jp], om->base ? sv : NULL,
                                 mode, mine);
                    }
            }
        events += mine[0];
        hit += mine[1];
    }
    counts[0] = events;
    counts[1] = hit;
    return failed ? -1 : 0;
}

#undef QC_NR
#endif

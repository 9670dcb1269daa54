/* The "pairwise" accumulator of qcompile.tiled over a matmul, fused: the pair sums are never stored
 * (the semantics are in qcompile/core/accumulator.py; this is its CPU kernel for training).
 *
 *   a[i*lda + k]     i < M, k < 2*pairs     the left operand (integer-valued floats), rows in reduction order
 *   b[k*ldb + j]     k < 2*pairs, j < N     the right operand
 *   acc[i*N + j]     the accumulator, updated in place (the caller sets its start: the bias, 0, or where a
 *                    previous chunk of whole pairs of the reduction left it); for each pair t:
 *                    p = a[i,2t] b[2t,j] + a[i,2t+1] b[2t+1,j]; q = clamp(p, lo, hi); v = acc + q; acc = clamp(v, lo, hi)
 *   overflowed[i*N + j]   set to 1 where a clamp changed a value (an event), else left as it is
 *
 * Returns the number of events. Exact whenever every product, pair sum and acc + q is exact in the
 * element type (the caller's plan guarantees it: below 2^24 in float, 2^53 in double). Blocks of
 * QC_PAIR_BLOCK columns of b stay in cache while every row of a runs over them (32: the block's
 * accumulators and counts fit in registers, measured against 256); blocks run on the OpenMP threads
 * (torch's own pool, as in clamp_scan.c) when the work is large.
 */
#include <stddef.h>
#include <stdint.h>

#define QC_PAIR_BLOCK 32

/* one pair for output j: p, its clamp q, v = acc + q and its clamp (the module's semantics) */
#define QC_PAIR_STEP(T)                                                                           \
    {                                                                                             \
        const T p = a0 * b0[j] + a1 * b1[j];                                                      \
        const T q = p < lo ? lo : (p > hi ? hi : p);                                              \
        const T v = block[j] + q;                                                                 \
        const T s = v < lo ? lo : (v > hi ? hi : v);                                              \
        hits[j] += (q != p) + (v != s);                                                           \
        block[j] = s;                                                                             \
    }

/* every pair of the reduction for the first n outputs of a block (in scope: a, lda, b, ldb, i, j0, pairs) */
#define QC_PAIR_RUN(T, n)                                                                       \
    for (int64_t t = 0; t < pairs; ++t) {                                                       \
        const T a0 = a[i * lda + 2 * t], a1 = a[i * lda + 2 * t + 1];                           \
        const T *b0 = b + (2 * t) * ldb + j0, *b1 = b0 + ldb;                                   \
        for (int64_t j = 0; j < (n); ++j)                                                       \
            QC_PAIR_STEP(T)                                                                     \
    }

#define QC_DEFINE_PAIR_MATMUL(name, T)                                                            \
int64_t name(const T *a, int64_t lda, const T *b, int64_t ldb, int64_t M, int64_t pairs,         \
             int64_t N, T *acc, uint8_t *overflowed, T lo, T hi)                                  \
{                                                                                                 \
    int64_t events = 0;                                                                           \
    const int64_t blocks = (N + QC_PAIR_BLOCK - 1) / QC_PAIR_BLOCK;                               \
    _Pragma("omp parallel for collapse(2) schedule(static) reduction(+:events) if(M * pairs * N >= 1048576)") \
    for (int64_t nb = 0; nb < blocks; ++nb)                                                       \
        for (int64_t i = 0; i < M; ++i) {                                                         \
            const int64_t j0 = nb * QC_PAIR_BLOCK;                                                \
            const int64_t m = N - j0 < QC_PAIR_BLOCK ? N - j0 : QC_PAIR_BLOCK;                    \
            T *c = acc + i * N + j0;                                                              \
            uint8_t *o = overflowed + i * N + j0;                                                 \
            T block[QC_PAIR_BLOCK];                                                               \
            int32_t hits[QC_PAIR_BLOCK];                                                          \
            for (int64_t j = 0; j < m; ++j) {                                                     \
                block[j] = c[j];                                                                  \
                hits[j] = 0;                                                                      \
            }                                                                                     \
            if (m == QC_PAIR_BLOCK)             /* a constant trip count: block and hits stay in registers */\
                QC_PAIR_RUN(T, QC_PAIR_BLOCK)                                                   \
            else                                                                                \
                QC_PAIR_RUN(T, m)                                                               \
            for (int64_t j = 0; j < m; ++j) {                                                     \
                c[j] = block[j];                                                                  \
                o[j] = (uint8_t)(o[j] | (hits[j] != 0));                                          \
                events += hits[j];                                                                \
            }                                                                                     \
        }                                                                                         \
    return events;                                                                                \
}

QC_DEFINE_PAIR_MATMUL(qc_pair_matmul_f32, float)
QC_DEFINE_PAIR_MATMUL(qc_pair_matmul_f64, double)

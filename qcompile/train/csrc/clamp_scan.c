/* The saturating accumulator of qcompile.tiled over a chunk of exact per-tile partial sums
 * (the semantics are in that module's docstring; this is its CPU kernel).
 *
 *   p[t*tile_stride + i*outer_stride + j]   partial sum of tile t for output (i, j),
 *                                           t < tiles, i < outer, j < inner
 *   acc[i*inner + j]                        the accumulator, updated in place:
 *                                           acc <- clamp(acc + p_t, lo, hi) for t = 0, 1, ...
 *                                           (pairs: acc <- clamp(acc + clamp(p_t, lo, hi), lo, hi))
 *                                           (from_zero: acc is not read, it starts at 0)
 *   overflowed[i*inner + j]                 set to 1 when a clamp changed a value (an event), else
 *                                           left as it is (first: set to 0, it is not read)
 *
 * Returns the number of events. Exact whenever acc + p_t is exact in the element type (the
 * caller's plan guarantees it: below 2^24 in float, 2^53 in double). One pass over the partial
 * sums: a block of accumulators stays in registers / L1 while every tile is added to it. Calls
 * with at least 2^20 partial sums run their blocks on the OpenMP threads (torch's own pool: the
 * library links libgomp.so.1, which torch has already loaded, so torch.set_num_threads applies).
 */
#include <stdint.h>

#define QC_SCAN_BLOCK 256

#define QC_DEFINE_CLAMP_SCAN(name, T)                                                           \
int64_t name(const T *p, int64_t tiles, int64_t tile_stride, int64_t outer, int64_t outer_stride, \
             int64_t inner, T *acc, uint8_t *overflowed, T lo, T hi, int from_zero, int first,  \
             int pairs)                                                                         \
{                                                                                               \
    int64_t events = 0;                                                                         \
    _Pragma("omp parallel for collapse(2) schedule(static) reduction(+:events) if(tiles * outer * inner >= 1048576)") \
    for (int64_t i = 0; i < outer; ++i)                                                         \
        for (int64_t j0 = 0; j0 < inner; j0 += QC_SCAN_BLOCK) {                                 \
            const int64_t m = inner - j0 < QC_SCAN_BLOCK ? inner - j0 : QC_SCAN_BLOCK;          \
            T *a = acc + i * inner + j0;                                                        \
            uint8_t *o = overflowed + i * inner + j0;                                           \
            T block[QC_SCAN_BLOCK];                                                             \
            int32_t hits[QC_SCAN_BLOCK];                                                        \
            for (int64_t j = 0; j < m; ++j) {                                                   \
                block[j] = from_zero ? (T)0 : a[j];                                             \
                hits[j] = 0;                                                                    \
            }                                                                                   \
            for (int64_t t = 0; t < tiles; ++t) {                                               \
                const T *pt = p + t * tile_stride + i * outer_stride + j0;                      \
                for (int64_t j = 0; j < m; ++j) {                                               \
                    const T q = pairs ? (pt[j] < lo ? lo : (pt[j] > hi ? hi : pt[j])) : pt[j];  \
                    const T v = block[j] + q;                                                   \
                    const T s = v < lo ? lo : (v > hi ? hi : v);                                \
                    hits[j] += (q != pt[j]) + (v != s);                                         \
                    block[j] = s;                                                               \
                }                                                                               \
            }                                                                                   \
            for (int64_t j = 0; j < m; ++j) {                                                   \
                a[j] = block[j];                                                                \
                o[j] = (uint8_t)((first ? 0 : o[j]) | (hits[j] != 0));                         \
                events += hits[j];                                                              \
            }                                                                                   \
        }                                                                                       \
    return events;                                                                              \
}

QC_DEFINE_CLAMP_SCAN(qc_clamp_scan_f32, float)
QC_DEFINE_CLAMP_SCAN(qc_clamp_scan_f64, double)

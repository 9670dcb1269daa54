/* One-pass CPU kernels of the quantizers' float32 arithmetic (qcompile.train.one_pass loads them;
 * each does, element by element, exactly the float32 operations of the torch expression it replaces,
 * in the same order, so the results are bitwise equal):
 *
 *   qc_fake_quant_rows(x, out, mask, rows, cols, inv_scale, scale, zp, lo, hi)
 *       row r of x (cols values): v = round_half_even(x * inv_scale[r]) (+ zp[r] when zp is not NULL),
 *       mask = lo <= v <= hi (when mask is not NULL), out = (clamp(v, lo, hi) (- zp[r])) * scale[r]:
 *       core.grids.unclamped_codes, then _FakeQuant's clamp, zero point and scale.
 *   status = qc_fake_quant_hindsight(h, x, out, mask, n, relu)
 *       a hindsight quantizer's step (h: its state, below) on one grid for all n values, the stored range's
 *       (scale, zp) = core.grids.qparams: v = zp + round_half_even(x * (1/scale)), mask = qmin <= v <= qmax
 *       (when mask is not NULL), out = (clamp(v, qmin, qmax) - zp) * scale: torch.fake_quantize_per_tensor_affine's
 *       CPU kernel for finite x (the zero point added even when 0, so a code of -0 comes out +0 as its integer
 *       codes do; a NaN stays NaN here); then x's min and max advance the state. status: QC_FINITE | QC_CLIPPED
 *       (a code fell outside [qmin, qmax]; where none did, the mask is all ones).
 *       relu = QC_RELU_BEFORE: the same on r = relu(x) (x < 0 ? 0 : x, torch.relu's bits: -0 and NaN stay) in
 *       place of x; QC_RELU_AFTER: out = relu(the fake quant's value). With a relu the mask holds two bits:
 *       QC_INSIDE (the code was inside the grid) and QC_POSITIVE (the relu's result is not <= 0), what
 *       qc_masked_rectified reads.
 *   qc_stochastic_codes(g, out, n, key, scale, lo, hi, times_scale, mult, inner, channels, range)
 *       x = g * m, u = k * 2^-16 + (0.5 + 2^-17) (the dither: k the int16 words of core.grids.dither_words,
 *       the SplitMix64 stream of `key`, formed here block by block), out = clamp(floor(u + x /
 *       scale), lo, hi) (* scale when times_scale): core.grids.stochastic_codes (lo, hi: the bounds minus
 *       the zero point), and stochastic_fake_quant. m: 1, or (mult non-NULL) one multiplier per channel
 *       of a channel axis, x = g·mult[c] as torch multiplies (runs of `inner` elements share a channel,
 *       run b is channel b % channels). range (non-NULL) <- min and max of x.
 *   status = qc_stochastic_codes_hindsight(h, g, out, n, key, times_scale, mult, inner, channels)
 *       a hindsight quantizer's step: qc_stochastic_codes on the stored range's grid (lo, hi = qmin - zp,
 *       qmax - zp), x's min and max then advancing the state. status: QC_FINITE or 0.
 *
 *   status = qc_fake_quant_rows_current(h, x, out, rows, cols, stats)
 *       a symmetric per-row (dim 0) current min-max quantizer's training step on a weight: row r's min and
 *       max (as qc_minmax_rows), its grid, and the row quantized on it while in cache (qc_fake_quant_rows
 *       without a zero point); where every row was finite, the state's lo[r], hi[r] <- them, initialized
 *       <- 1 and the grid buffers <- the grids (CurrentMinMax.forward, Quantizer._keep_grid), else only
 *       nonfinite += 1. stats: scratch for 3 * rows floats. status: QC_FINITE or 0.
 *
 *   The state h (qc_state) is the estimator's buffers lo, hi, initialized, nonfinite and the Quantizer's
 *   scale and zero_point (0-d for a hindsight step; one per row for the rows), and the grid's parameters
 *   (core.grids.qparams, pow2 off). A hindsight step quantizes on the grid of the stored range, known before the
 *   tensor is seen; the tensor's min and max (as torch.aminmax, NaN where it holds one), measured in the
 *   same pass, then update the state as RangeEstimator.stats, HindsightMinMax.forward and Quantizer._keep_grid do:
 *   where both are finite, lo <- (1 - momentum) * min + momentum * lo (so hi), initialized <- 1 and the
 *   grid buffers <- the grid used; else only nonfinite += 1 (QC_FINITE clear). Pow2 off. Where the state is
 *   not set (HindsightMinMax.unset()), a hindsight step writes nothing and returns QC_UNSET alone.
 *
 *   qc_minmax_rows(x, rows, cols, lo, hi)
 *       lo[r], hi[r] <- min and max of row r (cols values), as x.amin / x.amax over the other dims (NaN
 *       where the row holds one): a per-channel estimator's statistics of a weight, in one pass.
 *   qc_masked(g, mask, out, n)
 *       out = g * mask (the mask as 0.0 / 1.0): the straight-through gradient of the fake quants above, as
 *       torch multiplies a float tensor by a bool one (so -0, and NaN where g is, at masked values).
 *   qc_masked_rectified(g, mask, out, n)
 *       out = g * (mask & QC_INSIDE) where mask & QC_POSITIVE, else +0: the gradient of a fake quant and a relu
 *       together, as torch's threshold_backward (0 where the relu's result is <= 0) and the product by the
 *       fake quant's mask give it, in either order.
 *   qc_padded(x, out, planes, h, w, top, bottom, left, right, mult)
 *       out (planes, top + h + bottom, left + w + right) <- x (planes, h, w) zero-padded, each value x itself
 *       or (mult non-NULL) rint(x * *mult) (the float32 product rounded half to even: qcompile.train.tiled.
 *       _codes): a conv operand's values or codes with their padding, in one pass.
 *
 * Built with -std=c99, so gcc contracts no multiply-add into an fma (ISO C mode), and -fno-trapping-math,
 * which lets it vectorize the division (no FP exception is ever enabled); nearbyintf rounds
 * half to even in the default rounding mode. A NaN stays NaN through the clamps, as in torch. The min
 * and max are `omp simd` reductions: which of two equal values (-0, +0) they keep is unspecified, as in
 * torch.aminmax.
 * Calls of at least 2^16 values run on torch's OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { QC_FINITE = 1, QC_CLIPPED = 2, QC_UNSET = 4 };   /* the hindsight steps' status bits */
enum { QC_RELU_BEFORE = 1, QC_RELU_AFTER = 2 };         /* where a fake quant's relu is */
enum { QC_INSIDE = 1, QC_POSITIVE = 2 };                /* the bits of a rectified fake quant's mask */

typedef struct {
    float *lo, *hi;
    uint8_t *initialized;
    int64_t *nonfinite;
    float *scale, *zero_point;
    double momentum;
    float scale_eps, qmin, qmax;   /* core.grids.SCALE_EPS; the grid's code range */
    int symmetric;
} qc_state;

/* core.grids.qparams(lo, hi, (qmin, qmax), symmetric), its float32 operations in order. */
static void grid_of(const qc_state *h, float lo, float hi, float *scale, float *zp)
{
    float s, z = 0.0f;
    if (h->symmetric) {
        const float a = fabsf(lo), b = fabsf(hi);
        s = (a > b ? a : b) / h->qmax;
    } else {
        lo = lo > 0.0f ? 0.0f : lo;
        hi = hi < 0.0f ? 0.0f : hi;
        s = (hi - lo) / (h->qmax - h->qmin);
    }
    s = s < h->scale_eps ? h->scale_eps : s;
    if (!h->symmetric) {
        z = nearbyintf(h->qmin - lo / s);
        z = z < h->qmin ? h->qmin : z;
        z = z > h->qmax ? h->qmax : z;
    }
    *scale = s;
    *zp = z;
}

/* HindsightMinMax.unset(): no range yet, or only [0, 0] (a NaN bound counts as set, as bool(NaN) is true). */
static int unset(const qc_state *h)
{
    return !*h->initialized || (*h->lo == 0.0f && *h->hi == 0.0f);
}

/* The state after a pass that quantized on (scale, zp) and measured range = [min, max] (see the header). */
static int hindsight_advance(const qc_state *h, const float range[2], float scale, float zp)
{
    if (!(range[0] > -INFINITY && range[1] < INFINITY)) {
        *h->nonfinite += 1;
        return 0;
    }
    const float take = (float)(1.0 - h->momentum), keep = (float)h->momentum;
    *h->lo = take * range[0] + keep * *h->lo;
    *h->hi = take * range[1] + keep * *h->hi;
    *h->initialized = 1;
    *h->scale = scale;
    *h->zero_point = zp;
    return QC_FINITE;
}

/* One row of qc_fake_quant_rows without a zero point: v = round_half_even(x * is), m = lo <= v <= hi (m not
 * NULL), o = clamp(v, lo, hi) * s. */
static inline void fake_quant_row(const float *restrict x, float *restrict o, uint8_t *restrict m, int64_t n, float is,
                                  float s, float lo, float hi)
{
    for (int64_t i = 0; i < n; ++i) {
        float v = nearbyintf(x[i] * is);
        if (m)
            m[i] = v >= lo && v <= hi;
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        o[i] = v * s;
    }
}

void qc_fake_quant_rows(const float *restrict x, float *restrict out, uint8_t *restrict mask, int64_t rows, int64_t cols,
                        const float *inv_scale, const float *scale, const float *zp, float lo, float hi)
{
    #pragma omp parallel for schedule(static) if(rows * cols >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const float is = inv_scale[r], s = scale[r], z = zp ? zp[r] : 0.0f;
        const float *xr = x + r * cols;
        float *o = out + r * cols;
        uint8_t *m = mask ? mask + r * cols : 0;
        if (zp) {
            for (int64_t i = 0; i < cols; ++i) {
                float v = nearbyintf(xr[i] * is) + z;
                if (m)
                    m[i] = v >= lo && v <= hi;
                v = v < lo ? lo : v;
                v = v > hi ? hi : v;
                o[i] = (v - z) * s;
            }
        } else {
            fake_quant_row(xr, o, m, cols, is, s, lo, hi);
        }
    }
}

/* The body of fake_quant_tensor's loop over [i0, i1), with or without the mask and with the relu (if any)
 * before or after the fake quant (branches outside the loop, so each form vectorizes); accumulates the
 * quantized values' min, max, NaN flag and clip flag into rmn, rmx, rnan, rclip. */
#define FAKE_QUANT_TENSOR_LOOP(WITH_MASK, RELU)                                                        \
    _Pragma("omp simd reduction(min:rmn) reduction(max:rmx) reduction(|:rnan) reduction(|:rclip)")    \
    for (int64_t i = i0; i < i1; ++i) {                                                                \
        const float xi = RELU == QC_RELU_BEFORE && x[i] < 0.0f ? 0.0f : x[i];                          \
        float v = nearbyintf(xi * is) + zp;                                                            \
        const int inside = v >= lo && v <= hi;                                                         \
        rclip |= !inside;                                                                              \
        v = v < lo ? lo : v;                                                                           \
        v = v > hi ? hi : v;                                                                           \
        float o = (v - zp) * scale;                                                                    \
        o = RELU == QC_RELU_AFTER && o < 0.0f ? 0.0f : o;                                              \
        out[i] = o;                                                                                    \
        if (WITH_MASK)                                                                                 \
            mask[i] = RELU == QC_RELU_BEFORE ? inside | (!(xi <= 0.0f) ? QC_POSITIVE : 0)              \
                      : RELU == QC_RELU_AFTER ? inside | (!(o <= 0.0f) ? QC_POSITIVE : 0) : inside;    \
        rmn = xi < rmn ? xi : rmn;                                                                     \
        rmx = xi > rmx ? xi : rmx;                                                                     \
        rnan |= xi != xi;                                                                              \
    }

static int fake_quant_tensor(const float *restrict x, float *restrict out, uint8_t *restrict mask, int64_t n, float scale,
                             float zp, float lo, float hi, int relu, float *range)
{
    const float is = 1.0f / scale;
    const int64_t run = 16384, runs = (n + run - 1) / run;
    float mn = INFINITY, mx = -INFINITY;
    int nan = 0, clip = 0;
    #pragma omp parallel for schedule(static) reduction(min:mn) reduction(max:mx) reduction(|:nan) reduction(|:clip) \
        if(n >= 65536)
    for (int64_t b = 0; b < runs; ++b) {
        const int64_t i0 = b * run, i1 = (b + 1) * run < n ? (b + 1) * run : n;
        float rmn = INFINITY, rmx = -INFINITY;
        int rnan = 0, rclip = 0;
        if (relu == QC_RELU_BEFORE) {
            if (mask) {
                FAKE_QUANT_TENSOR_LOOP(1, QC_RELU_BEFORE)
            } else {
                FAKE_QUANT_TENSOR_LOOP(0, QC_RELU_BEFORE)
            }
        } else if (relu == QC_RELU_AFTER) {
            if (mask) {
                FAKE_QUANT_TENSOR_LOOP(1, QC_RELU_AFTER)
            } else {
                FAKE_QUANT_TENSOR_LOOP(0, QC_RELU_AFTER)
            }
        } else if (mask) {
            FAKE_QUANT_TENSOR_LOOP(1, 0)
        } else {
            FAKE_QUANT_TENSOR_LOOP(0, 0)
        }
        mn = rmn < mn ? rmn : mn;
        mx = rmx > mx ? rmx : mx;
        nan |= rnan;
        clip |= rclip;
    }
    range[0] = nan ? NAN : mn;
    range[1] = nan ? NAN : mx;
    return clip;
}

/* *lo, *hi <- min and max of the n values at x (NaN where one is NaN). */
static void row_minmax(const float *restrict x, int64_t n, float *lo, float *hi)
{
    float mn = INFINITY, mx = -INFINITY;
    int nan = 0;
    #pragma omp simd reduction(min:mn) reduction(max:mx) reduction(|:nan)
    for (int64_t i = 0; i < n; ++i) {
        mn = x[i] < mn ? x[i] : mn;
        mx = x[i] > mx ? x[i] : mx;
        nan |= x[i] != x[i];
    }
    *lo = nan ? NAN : mn;
    *hi = nan ? NAN : mx;
}

int qc_fake_quant_rows_current(const qc_state *h, const float *restrict x, float *restrict out, int64_t rows,
                               int64_t cols, float *restrict stats)
{
    float *mins = stats, *maxs = stats + rows, *scales = stats + 2 * rows;
    int bad = 0;
    #pragma omp parallel for schedule(static) reduction(|:bad) if(rows * cols >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * cols;
        float zp;
        row_minmax(xr, cols, &mins[r], &maxs[r]);
        bad |= !(mins[r] > -INFINITY && maxs[r] < INFINITY);
        grid_of(h, mins[r], maxs[r], &scales[r], &zp);
        fake_quant_row(xr, out + r * cols, 0, cols, 1.0f / scales[r], scales[r], h->qmin, h->qmax);
    }
    if (bad) {
        *h->nonfinite += 1;
        return 0;
    }
    memcpy(h->lo, mins, (size_t)rows * sizeof(float));
    memcpy(h->hi, maxs, (size_t)rows * sizeof(float));
    memcpy(h->scale, scales, (size_t)rows * sizeof(float));
    memset(h->zero_point, 0, (size_t)rows * sizeof(float));
    *h->initialized = 1;
    return QC_FINITE;
}

int qc_fake_quant_hindsight(const qc_state *h, const float *restrict x, float *restrict out, uint8_t *restrict mask,
                            int64_t n, int relu)
{
    float scale, zp, range[2];
    if (unset(h))
        return QC_UNSET;
    grid_of(h, *h->lo, *h->hi, &scale, &zp);
    const int clip = fake_quant_tensor(x, out, mask, n, scale, zp, h->qmin, h->qmax, relu, range);
    return hindsight_advance(h, range, scale, zp) | (clip ? QC_CLIPPED : 0);
}

void qc_minmax_rows(const float *restrict x, int64_t rows, int64_t cols, float *restrict lo, float *restrict hi)
{
    #pragma omp parallel for schedule(static) if(rows * cols >= 65536)
    for (int64_t r = 0; r < rows; ++r)
        row_minmax(x + r * cols, cols, &lo[r], &hi[r]);
}

void qc_masked(const float *restrict g, const uint8_t *restrict mask, float *restrict out, int64_t n)
{
    #pragma omp parallel for simd schedule(static) if(n >= 65536)
    for (int64_t i = 0; i < n; ++i)
        out[i] = g[i] * (float)mask[i];
}

void qc_masked_rectified(const float *restrict g, const uint8_t *restrict mask, float *restrict out, int64_t n)
{
    #pragma omp parallel for simd schedule(static) if(n >= 65536)
    for (int64_t i = 0; i < n; ++i)
        out[i] = mask[i] & QC_POSITIVE ? g[i] * (float)(mask[i] & QC_INSIDE) : 0.0f;
}

void qc_padded(const float *restrict x, float *restrict out, int64_t planes, int64_t h, int64_t w, int64_t top,
               int64_t bottom, int64_t left, int64_t right, const float *restrict mult)
{
    const int64_t ow = left + w + right, oh = top + h + bottom;
    #pragma omp parallel for schedule(static) if(planes * oh * ow >= 65536)
    for (int64_t p = 0; p < planes; ++p) {
        const float *xp = x + p * h * w;
        float *o = out + p * oh * ow;
        memset(o, 0, (size_t)(top * ow) * sizeof(float));
        for (int64_t r = 0; r < h; ++r) {
            float *orow = o + (top + r) * ow;
            const float *xr = xp + r * w;
            memset(orow, 0, (size_t)left * sizeof(float));
            if (mult) {
                const float m = *mult;
                #pragma omp simd
                for (int64_t c = 0; c < w; ++c)
                    orow[left + c] = nearbyintf(xr[c] * m);
            } else {
                memcpy(orow + left, xr, (size_t)w * sizeof(float));
            }
            memset(orow + left + w, 0, (size_t)right * sizeof(float));
        }
        memset(o + (top + h) * ow, 0, (size_t)(bottom * ow) * sizeof(float));
    }
}

/* Word j of the SplitMix64 stream seeded with key (core.grids.splitmix_words). */
static inline uint64_t splitmix(uint64_t key, uint64_t j)
{
    uint64_t z = key + (j + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#define DITHER_BLOCK 1024   /* elements whose dither words are formed at a time (a multiple of 4) */

void qc_stochastic_codes(const float *restrict g, float *restrict out, int64_t n, int64_t key, float scale,
                         float lo, float hi, int times_scale, const float *restrict mult, int64_t inner,
                         int64_t channels, float *range)
{
    const float step = 1.0f / 65536.0f, mid = 0.5f + 1.0f / 131072.0f, times = times_scale ? scale : 1.0f;
    const int64_t run = mult ? inner : 16384, runs = run > 0 ? (n + run - 1) / run : 0;
    float mn = INFINITY, mx = -INFINITY;
    int nan = 0;
    #pragma omp parallel for schedule(static) reduction(min:mn) reduction(max:mx) reduction(|:nan) if(n >= 65536)
    for (int64_t b = 0; b < runs; ++b) {
        const float m = mult ? mult[b % channels] : 1.0f;                  /* g * 1 is g, bit for bit */
        const int64_t end = (b + 1) * run < n ? (b + 1) * run : n;
        float rmn = INFINITY, rmx = -INFINITY;                             /* the run's, then the thread's */
        int rnan = 0;
        for (int64_t i0 = b * run; i0 < end; i0 += DITHER_BLOCK) {
            const int64_t i1 = i0 + DITHER_BLOCK < end ? i0 + DITHER_BLOCK : end, w0 = i0 >> 2;
            union { uint64_t w[DITHER_BLOCK / 4 + 1]; int16_t k[4 * (DITHER_BLOCK / 4 + 1)]; } d;
            #pragma omp simd
            for (int64_t j = w0; j < (i1 + 3) >> 2; ++j)
                d.w[j - w0] = splitmix((uint64_t)key, (uint64_t)j);
            const int16_t *k = d.k + (i0 - 4 * w0);                        /* k[i - i0]: element i's word */
            #pragma omp simd reduction(min:rmn) reduction(max:rmx) reduction(|:rnan)
            for (int64_t i = i0; i < i1; ++i) {
                const float x = g[i] * m, u = (float)k[i - i0] * step + mid;
                float v = floorf(u + x / scale);
                v = v < lo ? lo : v;
                v = v > hi ? hi : v;
                out[i] = v * times;
                rmn = x < rmn ? x : rmn;
                rmx = x > rmx ? x : rmx;
                rnan |= x != x;
            }
        }
        mn = rmn < mn ? rmn : mn;
        mx = rmx > mx ? rmx : mx;
        nan |= rnan;
    }
    if (range) {
        range[0] = nan ? NAN : mn;
        range[1] = nan ? NAN : mx;
    }
}

int qc_stochastic_codes_hindsight(const qc_state *h, const float *restrict g, float *restrict out, int64_t n,
                                  int64_t key, int times_scale, const float *restrict mult, int64_t inner,
                                  int64_t channels)
{
    float scale, zp, range[2];
    if (unset(h))
        return QC_UNSET;
    grid_of(h, *h->lo, *h->hi, &scale, &zp);
    qc_stochastic_codes(g, out, n, key, scale, h->qmin - zp, h->qmax - zp, times_scale, mult, inner, channels, range);
    return hindsight_advance(h, range, scale, zp);
}

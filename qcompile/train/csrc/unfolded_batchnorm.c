/* BatchNorm with batch statistics of z = y / fold, one value of fold per channel, without forming z
 * (qcompile.train.fused_bn._NormalizeUnfolded; its backward is torch's native_batch_norm_backward):
 *
 *   qc_unfolded_batchnorm(y, n, c, hw, fold, gamma, beta, eps, out, stats)
 *       y: (n, c, hw) float32, channel k's values y[(i*c + k)*hw + j]. Per channel, in float64: mean_y and
 *       the biased variance var_y of y (sums of y and y*y: each square of a float32 is exact in float64;
 *       var_y = E[y^2] - mean_y^2, floored at 0), var_z = var_y / fold^2, mean_z = mean_y / fold,
 *       s = 1 / (fold * sqrt(var_z + eps)) (so (z - mean_z) / sqrt(var_z + eps) = (y - mean_y) * s),
 *       gain = s * gamma, shift = beta - mean_y * gain (gamma, beta NULL: 1 and 0). Then
 *       out = y * gain + shift in float32, and stats (4 rows of c float32) <- mean_y, s, mean_z, var_z.
 *
 * Channels go in blocks of QC_BLOCK: a block's n runs of QC_BLOCK*hw contiguous values are read for the
 * moments, then read again for the output while they are still in cache. Calls with at least 2^16
 * values run their blocks on the OpenMP threads (torch's own pool: the library links libgomp.so.1, which
 * torch has already loaded).
 */
#include <math.h>
#include <stdint.h>

#define QC_BLOCK 16

void qc_unfolded_batchnorm(const float *restrict y, int64_t n, int64_t c, int64_t hw, const float *fold,
                           const float *gamma, const float *beta, double eps, float *restrict out, float *stats)
{
    const int64_t blocks = (c + QC_BLOCK - 1) / QC_BLOCK;
    const double count = (double)(n * hw);
    #pragma omp parallel for schedule(static) if(n * c * hw >= 65536)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t c0 = b * QC_BLOCK, c1 = c0 + QC_BLOCK < c ? c0 + QC_BLOCK : c;
        double sum[QC_BLOCK] = {0}, squares[QC_BLOCK] = {0};
        float gain[QC_BLOCK], shift[QC_BLOCK];
        for (int64_t i = 0; i < n; i++)
            for (int64_t k = c0; k < c1; k++) {
                const float *p = y + (i * c + k) * hw;
                double s = 0.0, ss = 0.0;
                #pragma omp simd reduction(+:s, ss)
                for (int64_t j = 0; j < hw; j++) {
                    const double v = p[j];
                    s += v;
                    ss += v * v;
                }
                sum[k - c0] += s;
                squares[k - c0] += ss;
            }
        for (int64_t k = c0; k < c1; k++) {
            const double f = fold[k], mean_y = sum[k - c0] / count, v = squares[k - c0] / count - mean_y * mean_y;
            const double var_z = (v > 0.0 ? v : 0.0) / (f * f), s = 1.0 / (f * sqrt(var_z + eps));
            const double g = gamma ? s * gamma[k] : s;
            gain[k - c0] = (float)g;
            shift[k - c0] = (float)((beta ? beta[k] : 0.0) - mean_y * g);
            stats[k] = (float)mean_y;
            stats[c + k] = (float)s;
            stats[2 * c + k] = (float)(mean_y / f);
            stats[3 * c + k] = (float)var_z;
        }
        for (int64_t i = 0; i < n; i++)
            for (int64_t k = c0; k < c1; k++) {
                const float *p = y + (i * c + k) * hw;
                float *o = out + (i * c + k) * hw;
                const float a = gain[k - c0], d = shift[k - c0];
                #pragma omp simd
                for (int64_t j = 0; j < hw; j++)
                    o[j] = p[j] * a + d;
            }
    }
}

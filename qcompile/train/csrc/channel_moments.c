/* Per-channel moments of an (N, C, HW) float32 tensor (qcompile.train.fused_bn reads them for the
 * batch statistics of a folded BatchNorm, without forming the unfolded tensor):
 *
 *   qc_channel_moments(y, n, c, hw, mean, var)
 *       for each channel k < c, over the n*hw values y[(i*c + k)*hw + j]: mean[k] = their mean and
 *       var[k] = their biased variance, as float32 rounded from float64 sums of y and y*y (each square
 *       of a float32 is exact in float64); var is E[y^2] - mean^2, floored at 0.
 *
 * Channels go in blocks of QC_BLOCK, and each block reads its n runs of QC_BLOCK*hw contiguous values
 * (small hw stays a sequential read). Calls with at least 2^16 values run their blocks on the OpenMP
 * threads (torch's own pool: the library links libgomp.so.1, which torch has already loaded).
 */
#include <stdint.h>

#define QC_BLOCK 16

void qc_channel_moments(const float *y, int64_t n, int64_t c, int64_t hw, float *mean, float *var) {
    int64_t blocks = (c + QC_BLOCK - 1) / QC_BLOCK;
    double count = (double)(n * hw);
    #pragma omp parallel for schedule(static) if(n * c * hw >= 65536)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t c0 = b * QC_BLOCK, c1 = c0 + QC_BLOCK < c ? c0 + QC_BLOCK : c;
        double sum[QC_BLOCK] = {0}, squares[QC_BLOCK] = {0};
        for (int64_t i = 0; i < n; i++)
            for (int64_t k = c0; k < c1; k++) {
                const float *p = y + (i * c + k) * hw;
                double s = 0.0, ss = 0.0;
                #pragma omp simd reduction(+:s, ss)
                for (int64_t j = 0; j < hw; j++) {
                    double v = p[j];
                    s += v;
                    ss += v * v;
                }
                sum[k - c0] += s;
                squares[k - c0] += ss;
            }
        for (int64_t k = c0; k < c1; k++) {
            double m = sum[k - c0] / count, v = squares[k - c0] / count - m * m;
            mean[k] = (float)m;
            var[k] = (float)(v > 0.0 ? v : 0.0);
        }
    }
}

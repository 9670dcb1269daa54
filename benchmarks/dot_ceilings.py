"""The single-thread ceiling of each int8 dot-product instruction sequence on this CPU, in GMAC/s.

Each sequence runs in a loop of independent accumulator chains on register operands (no memory, no
dependence between chains but the accumulators' own), so the figure is what the vector ports allow,
the most any kernel built on that sequence can reach:

  exact int16        vpmaddwd + vpaddd                  16 products (int16 pairs summed in int32): the
                                                        AVX2 exact kernel (gemm.c.j2, qc_gemm_exact)
  onnxruntime AVX2   vpmaddubsw + vpmaddwd(1) + vpaddd  32 u8 x s8 products, pairs saturated to int16,
                                                        then widened and summed in int32 (not exact)
  pairwise           vpbroadcastd + vpmaddubsw + vpaddsw 32 products, pairs and the running sum
                                                        saturated to int16 (qcompile's "pairwise" mode)
  VNNI zmm           vpdpbusd                           64 u8 x s8 products into int32, exact
                                                        (only where the CPU has AVX-512 VNNI)

    .venv/bin/python benchmarks/dot_ceilings.py [--iters 20000000]
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from qcompile.tools.machine import cpu

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static const int w[16] __attribute__((aligned(64)));
int main(int argc, char **argv)
{
    const long n = atol(argv[1]);
    const int *p = w;
    double t0 = now(), t1, t2, t3, t4;
    long k;
    for (k = 0; k < n; ++k)          /* 8 chains, 16 madd: 256 products */
        __asm__ volatile(".rept 2\n"
            "vpmaddwd %%ymm0,%%ymm1,%%ymm2\n vpaddd %%ymm2,%%ymm8,%%ymm8\n vpmaddwd %%ymm0,%%ymm1,%%ymm3\n vpaddd %%ymm3,%%ymm9,%%ymm9\n"
            "vpmaddwd %%ymm0,%%ymm1,%%ymm4\n vpaddd %%ymm4,%%ymm10,%%ymm10\n vpmaddwd %%ymm0,%%ymm1,%%ymm5\n vpaddd %%ymm5,%%ymm11,%%ymm11\n"
            "vpmaddwd %%ymm0,%%ymm1,%%ymm6\n vpaddd %%ymm6,%%ymm12,%%ymm12\n vpmaddwd %%ymm0,%%ymm1,%%ymm7\n vpaddd %%ymm7,%%ymm13,%%ymm13\n"
            "vpmaddwd %%ymm0,%%ymm1,%%ymm2\n vpaddd %%ymm2,%%ymm14,%%ymm14\n vpmaddwd %%ymm0,%%ymm1,%%ymm3\n vpaddd %%ymm3,%%ymm15,%%ymm15\n"
            ".endr\n" ::: "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
            "xmm13", "xmm14", "xmm15");
    t1 = now();
    for (k = 0; k < n; ++k)          /* 4 chains, 8 vpmaddubsw: 256 products */
        __asm__ volatile(".rept 2\n"
            "vpmaddubsw %%ymm0,%%ymm1,%%ymm2\n vpmaddwd %%ymm2,%%ymm7,%%ymm2\n vpaddd %%ymm2,%%ymm8,%%ymm8\n"
            "vpmaddubsw %%ymm0,%%ymm1,%%ymm3\n vpmaddwd %%ymm3,%%ymm7,%%ymm3\n vpaddd %%ymm3,%%ymm9,%%ymm9\n"
            "vpmaddubsw %%ymm0,%%ymm1,%%ymm4\n vpmaddwd %%ymm4,%%ymm7,%%ymm4\n vpaddd %%ymm4,%%ymm10,%%ymm10\n"
            "vpmaddubsw %%ymm0,%%ymm1,%%ymm5\n vpmaddwd %%ymm5,%%ymm7,%%ymm5\n vpaddd %%ymm5,%%ymm11,%%ymm11\n"
            ".endr\n" ::: "xmm2", "xmm3", "xmm4", "xmm5", "xmm8", "xmm9", "xmm10", "xmm11");
    t2 = now();
    for (k = 0; k < n; ++k)          /* 8 chains, 16 vpmaddubsw: 512 products, a weight broadcast per 2 */
        __asm__ volatile(".rept 2\n"
            "vpbroadcastd (%0),%%ymm2\n vpmaddubsw %%ymm2,%%ymm0,%%ymm3\n vpaddsw %%ymm3,%%ymm8,%%ymm8\n vpmaddubsw %%ymm2,%%ymm1,%%ymm4\n vpaddsw %%ymm4,%%ymm9,%%ymm9\n"
            "vpbroadcastd 4(%0),%%ymm2\n vpmaddubsw %%ymm2,%%ymm0,%%ymm3\n vpaddsw %%ymm3,%%ymm10,%%ymm10\n vpmaddubsw %%ymm2,%%ymm1,%%ymm4\n vpaddsw %%ymm4,%%ymm11,%%ymm11\n"
            "vpbroadcastd 8(%0),%%ymm2\n vpmaddubsw %%ymm2,%%ymm0,%%ymm3\n vpaddsw %%ymm3,%%ymm12,%%ymm12\n vpmaddubsw %%ymm2,%%ymm1,%%ymm4\n vpaddsw %%ymm4,%%ymm13,%%ymm13\n"
            "vpbroadcastd 12(%0),%%ymm2\n vpmaddubsw %%ymm2,%%ymm0,%%ymm3\n vpaddsw %%ymm3,%%ymm14,%%ymm14\n vpmaddubsw %%ymm2,%%ymm1,%%ymm4\n vpaddsw %%ymm4,%%ymm15,%%ymm15\n"
            ".endr\n" :: "r"(p) : "xmm2", "xmm3", "xmm4", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    t3 = now();
#if defined(__AVX512VNNI__)
    for (k = 0; k < n; ++k)          /* 8 chains, 16 vpdpbusd: 1024 products */
        __asm__ volatile(".rept 2\n"
            "vpdpbusd %%zmm0,%%zmm1,%%zmm8\n vpdpbusd %%zmm0,%%zmm1,%%zmm9\n vpdpbusd %%zmm0,%%zmm1,%%zmm10\n vpdpbusd %%zmm0,%%zmm1,%%zmm11\n"
            "vpdpbusd %%zmm0,%%zmm1,%%zmm12\n vpdpbusd %%zmm0,%%zmm1,%%zmm13\n vpdpbusd %%zmm0,%%zmm1,%%zmm14\n vpdpbusd %%zmm0,%%zmm1,%%zmm15\n"
            ".endr\n" ::: "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
#endif
    t4 = now();
    printf("%.3f %.3f %.3f %.3f\n", n * 256 / (t1 - t0) / 1e9, n * 256 / (t2 - t1) / 1e9, n * 512 / (t3 - t2) / 1e9,
           t4 > t3 + 1e-6 ? n * 1024 / (t4 - t3) / 1e9 : 0.0);
    (void)argc;
    return 0;
}
"""

ROWS = ("exact int16: vpmaddwd + vpaddd", "onnxruntime AVX2: vpmaddubsw + vpmaddwd + vpaddd",
        "pairwise: vpmaddubsw + vpaddsw", "VNNI zmm: vpdpbusd")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20_000_000)
    ap.add_argument("--rounds", type=int, default=3, help="runs; the best counts")
    args = ap.parse_args()
    print(f"CPU: {cpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "ceilings.c", Path(tmp) / "ceilings"
        src.write_text(SOURCE)
        subprocess.run(["gcc", "-O2", "-march=native", "-o", str(exe), str(src)], check=True)
        best = [0.0] * 4
        for _ in range(args.rounds):
            out = subprocess.run([str(exe), str(args.iters)], capture_output=True, text=True, check=True).stdout
            best = [max(b, float(v)) for b, v in zip(best, out.split())]
    exact = best[0]
    print("\n| sequence | GMAC/s | ÷ exact int16 |\n|---|---|---|")
    for name, g in zip(ROWS, best):
        if g:
            print(f"| {name} | {g:.1f} | {g / exact:.2f}× |")


if __name__ == "__main__":
    main()

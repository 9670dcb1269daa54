"""The machine a benchmark runs on, for its header: figures from different CPUs are never compared."""
from __future__ import annotations

import os
import platform
from pathlib import Path

# the flags that decide integer speed: AVX2 (vpmaddubsw), AVX-512, VNNI (vpdpbusd), AMX
INTEGER_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu() -> str:
    """'<CPU model> [<integer flags present>], <n> cores'."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    shown = [f for f in INTEGER_FLAGS if f in flags]
    return f"{model} [{' '.join(shown) or 'no AVX2'}], {os.cpu_count()} cores"

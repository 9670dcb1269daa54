"""CPU kernels in C (qcompile/csrc), built once with the system C compiler and loaded with ctypes.

A library is compiled on first use into a per-user cache (QCOMPILE_CACHE, else
~/.cache/qcompile), named by a hash of its source, the compiler flags and this CPU's feature
flags, so a changed source or another machine gets its own build; the build writes a temporary
file and renames it, so concurrent processes never load a half-written library. When no compiler
is found or the build fails, `library` returns None once with a warning, and callers use their
torch implementation; QCOMPILE_NATIVE=0 asks for that explicitly. ctypes releases the GIL
during a call. Kernels are built with -fopenmp: they link libgomp.so.1, which resolves to the
copy torch has already loaded, so their parallel loops share torch's threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared", "-std=c99", "-fopenmp"]

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


class NativeBuildWarning(UserWarning):
    """A C kernel could not be built; the torch implementation is used instead."""


def enabled() -> bool:
    return os.environ.get("QCOMPILE_NATIVE", "1") != "0"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    root = os.environ.get("QCOMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qcompile")
    return Path(root)


def _build(name: str) -> ctypes.CDLL:
    src = CSRC / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc / gcc) on PATH")
    key = hashlib.sha256(b"\0".join([src.read_bytes(), " ".join([cc, *CFLAGS]).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"{name}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *CFLAGS, str(src), "-o", tmp], capture_output=True, text=True)
            if proc.returncode:
                raise OSError(f"{cc} failed on {src}:\n{proc.stderr.strip()}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(out))


def library(name: str) -> ctypes.CDLL | None:
    """The built library csrc/<name>.c, or None (disabled, or it cannot be built: warned once)."""
    if not enabled():
        return None
    if name in _loaded:            # built (or failed) once: read without the lock
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _build(name)
            except OSError as e:
                warnings.warn(f"qcompile: the C kernel {name!r} is unavailable ({e}); using the slower torch "
                              "implementation", NativeBuildWarning, stacklevel=3)
                _loaded[name] = None
        return _loaded[name]

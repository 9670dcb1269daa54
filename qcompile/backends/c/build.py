"""Build and run the C runtime `codegen.emit` wrote: gcc through the generated Makefile,
then the generated harness on numpy arrays (raw files in a temporary directory).

Invariant: `run` returns, for every graph output, an array of shape (N, *shape) in the
output's storage dtype holding exactly the bytes the C code wrote for the N input samples.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from qcompile.errors import QCompileError

SANITIZE = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"


def manifest(out_dir) -> dict:
    found = [p for p in Path(out_dir).glob("*.json") if (p.with_suffix(".c")).exists()]
    if len(found) != 1:
        raise QCompileError(f"{out_dir}: expected one <name>.json written by codegen.emit next to <name>.c, found {found}")
    return json.loads(found[0].read_text())


def build(out_dir, opt: str = "-O2", sanitize: bool = False, extra: str = "", target: str | None = None) -> Path:
    """Compile with gcc (`make` in `out_dir`) and return the harness executable.

    opt: optimisation flags (e.g. "-O3 -march=native"); sanitize: AddressSanitizer and
    UndefinedBehaviorSanitizer, any report aborts the run."""
    out_dir = Path(out_dir).resolve()
    name = manifest(out_dir)["name"]
    target = target or (f"{name}_asan" if sanitize else name)
    flags = f"{extra} {SANITIZE}" if sanitize else extra
    cmd = ["make", "-s", "-B", "-C", str(out_dir), f"OPT={opt}", f"EXTRA={flags.strip()}", f"TARGET={target}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise QCompileError(f"gcc failed on {out_dir}:\n{proc.stdout}{proc.stderr}")
    return out_dir / target


def run(out_dir, *inputs: np.ndarray, exe=None) -> list[np.ndarray]:
    """Run the harness on a batch: each input (N, *shape) of integer codes → outputs (N, *shape)."""
    out_dir = Path(out_dir).resolve()
    info = manifest(out_dir)
    exe = Path(exe) if exe is not None else out_dir / info["name"]
    if not exe.exists():
        exe = build(out_dir)
    if len(inputs) != len(info["inputs"]):
        raise ValueError(f"{info['name']} takes {len(info['inputs'])} input(s), got {len(inputs)}")
    n = None
    with tempfile.TemporaryDirectory() as tmp:
        args = []
        for k, (x, spec) in enumerate(zip(inputs, info["inputs"])):
            x = np.asarray(x)
            if tuple(x.shape[1:]) != tuple(spec["shape"]):
                raise ValueError(f"input {k} ({spec['name']}): expected shape (N, {', '.join(map(str, spec['shape']))}), "
                                 f"got {x.shape}")
            if x.size and (x.min() < np.iinfo(spec["dtype"]).min or x.max() > np.iinfo(spec["dtype"]).max):
                raise ValueError(f"input {k} ({spec['name']}): codes outside {spec['dtype']}")
            if n is not None and x.shape[0] != n:
                raise ValueError("all inputs need the same number of samples")
            n = x.shape[0]
            path = Path(tmp) / f"in{k}.bin"
            np.ascontiguousarray(x.astype(spec["dtype"])).tofile(path)
            args.append(str(path))
        outs = [Path(tmp) / f"out{k}.bin" for k in range(len(info["outputs"]))]
        proc = subprocess.run([str(exe), *args, *map(str, outs)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise QCompileError(f"{exe.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return [np.fromfile(p, dtype=spec["dtype"]).reshape(n, *spec["shape"])
                for p, spec in zip(outs, info["outputs"])]


def bench(out_dir, *inputs: np.ndarray, repeats: int = 10, exe=None) -> float:
    """Median seconds of `repeats` single-sample runs of the harness (first sample of each input), one thread."""
    out_dir = Path(out_dir).resolve()
    info = manifest(out_dir)
    exe = Path(exe) if exe is not None else out_dir / info["name"]
    with tempfile.TemporaryDirectory() as tmp:
        args = []
        for k, (x, spec) in enumerate(zip(inputs, info["inputs"])):
            path = Path(tmp) / f"in{k}.bin"
            np.ascontiguousarray(np.asarray(x)[:1].astype(spec["dtype"])).tofile(path)
            args.append(str(path))
        proc = subprocess.run([str(exe), "--bench", str(repeats), *args], capture_output=True, text=True, check=True)
    return int(proc.stdout.strip()) * 1e-9


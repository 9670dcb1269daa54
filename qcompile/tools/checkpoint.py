"""Run checkpoints: written atomically, read with `weights_only=True`, validated before use.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (nothing that
unpickles code): FORMAT, the run's configs as JSON text, the model's `state_dict()` (every
parameter and every quantizer/estimator buffer), the optimizer's, the progress counters and
every process's torch RNG state. Invariant: a path this module wrote holds either the previous
complete checkpoint or the new complete one (temp file in the same directory, fsync, rename),
never a partial one; `read` raises CheckpointError naming the path and the cause.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from qcompile.errors import CheckpointError

FORMAT = "qcompile-run/1"
KEYS = ("format", "run", "model", "optimizer", "progress", "rng", "metrics")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write) -> None:
    """Call `write(file)` on a temp file next to `path`, fsync it, then rename it onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def save(checkpoint: dict, path: str | Path) -> None:
    missing = [k for k in KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint for {str(path)!r} lacks {missing}")
    write_atomic(path, lambda f: torch.save(checkpoint, f))


def read(path: str | Path) -> dict:
    """The checkpoint at `path`, its structure checked; its `run` JSON decoded into a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt ({type(exc).__name__}: {first}); "
                              "nothing was loaded") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is not a qcompile run checkpoint ({FORMAT}); it holds "
                              f"{what!r} (a bare state_dict loads with qm.load_checkpoint)")
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}; nothing was loaded")
    try:
        ckpt["run"] = json.loads(ckpt["run"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: its run configuration is not valid JSON ({exc})") from None
    return ckpt

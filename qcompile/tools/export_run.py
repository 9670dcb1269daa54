"""`qcompile export`: a run checkpoint → ONNX (and the C runtime), with every backend's held-out accuracy.

The compiled model is rebuilt from the configs the checkpoint holds (no flags repeated), its
state loaded after the keys and shapes are checked, lowered once; the integer graph goes to
onnxruntime, the numpy reference and (with `build`) the generated C, and each one's accuracy on
the run's own held-out set is printed beside the trained graph's (PyTorch, eval mode).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qcompile.backends import parity
from qcompile.errors import CheckpointError
from qcompile.tools import checkpoint
from qcompile.tools.deploy import emit_c, export_onnx
from qcompile.tools.trainer import Processes, prepare, stored_configs
from qcompile.train.graph_module import check_state_dict


@dataclass
class ExportResult:
    accuracy: dict[str, float]
    differ: dict[str, int]
    samples: int
    files: list[Path]


def export_checkpoint(path, onnx_path=None, format: str = "qdq", c_dir=None, build: bool = False,
                      limit: int | None = None, log=print) -> ExportResult:
    """Rebuild the run's compiled model from checkpoint `path`, export it, report every backend's accuracy
    on the first `limit` held-out samples (all by default)."""
    ckpt = checkpoint.read(path)
    where = f"checkpoint {str(path)!r}"
    train, qconfig = stored_configs(ckpt["run"], where)
    if qconfig is None:
        raise CheckpointError(f"{where} is a float baseline's (RUN_DIR/fp32); export the quantized run's checkpoint")
    setup = prepare(train.replace(device="cpu", augment=False), qconfig, Processes())
    qm = setup.model
    check_state_dict(qm.state_dict(), ckpt["model"], where)
    qm.load_state_dict(ckpt["model"])
    qm.eval()
    val = setup.data.val
    n = len(val) if limit is None else min(limit, len(val))
    x = torch.stack([val[i][0] for i in range(n)])
    y = torch.tensor([int(val[i][1]) for i in range(n)])
    with torch.no_grad():
        trained = torch.cat([qm(x[i:i + 500]) for i in range(0, n, 500)])
    files = []
    from qcompile.ir.lower import lower
    graph = lower(qm)
    if onnx_path is not None:
        export_onnx(graph, onnx_path, format)
        files.append(Path(onnx_path))
    cmp = parity.compare(graph, x, ("reference", f"onnx:{format}"), given={"PyTorch": trained})
    if c_dir is not None:
        module = emit_c(graph, c_dir)
        files += list(module.files)
        if build:
            cmp.codes["C"] = parity.outputs(graph, x, "c", c_dir)
    names = {"PyTorch": "PyTorch", "reference": "reference", f"onnx:{format}": f"onnxruntime ({format})", "C": "C"}
    accuracy = {names[k]: cmp.accuracy(k, y.numpy()) for k in cmp.codes}
    differ = {f"{names[a]} vs {names[b]}": cmp.differ(a, b) for a, b in cmp.pairs()}
    for f in files:
        log(f"wrote {f}")
    log(f"held-out accuracy ({n} samples of {train.data}): " + " | ".join(f"{k} {v:.2f}%" for k, v in accuracy.items()))
    log("predictions that differ: " + ", ".join(f"{k}: {v}" for k, v in differ.items()))
    return ExportResult(accuracy, differ, n, files)

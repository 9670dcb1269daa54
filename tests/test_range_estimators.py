"""The range-estimator experiment: its rows, its probes, its report, and the paper-protocol commands."""
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qcompile
from qcompile.tools import cli
from qcompile.tools.experiments import range_estimators as re_exp

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_rows_configure_the_papers_settings():
    t1 = re_exp.Row("1", "running").qconfig()
    assert (t1.quantize_weights, t1.quantize_activations, t1.grad_bits, t1.grad_range) == (False, False, 8, "running")
    t2 = re_exp.Row("2", "dsgc").qconfig()
    assert (t2.quantize_weights, t2.quantize_activations, t2.grad_bits, t2.act_range) == (False, True, None, "dsgc")
    t3 = re_exp.Row("3-g4", "dsgc").qconfig()     # DSGC's authors quantize activations with current min-max
    assert (t3.grad_bits, t3.grad_range, t3.act_range, t3.weight_range) == (4, "dsgc", "current", "current")
    assert re_exp.Row("3", "hindsight").qconfig().act_range == "hindsight"
    assert re_exp.Row("2", "current").probed_kind == "activation" and re_exp.Row("1-g4", "current").probed_kind == "gradient"


def _probe(qconfig, x, y, kind):
    torch.manual_seed(0)
    qm = qcompile.compile(qcompile.models.get("models:lenet5"), x[:2], qconfig)
    probe = re_exp.Probe(qm, kind)
    torch.nn.functional.cross_entropy(qm(x), y).backward()
    return probe.close()


def test_probe_measures_clipping_and_sqnr():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    current = _probe(qcompile.QConfig(grad_bits=8, grad_range="current"), x, y, "gradient")
    assert current["clipped"] == 0.0 and 15 < current["sqnr_db"] < 60      # min-max of g itself clips nothing
    tight = _probe(qcompile.QConfig(grad_bits=8, grad_range="fixed", grad_fixed_range=(-1e-5, 1e-5)), x, y, "gradient")
    assert tight["clipped"] > 0.01 and tight["sqnr_db"] < current["sqnr_db"]
    acts = _probe(qcompile.QConfig(act_range="fixed", act_fixed_range=(-0.5, 0.5)), x, y, "activation")
    assert 0 < acts["clipped"] < 1
    fine = _probe(qcompile.QConfig(act_bits=16, act_range="current"), x, y, "activation")
    assert fine["clipped"] == 0.0 and fine["sqnr_db"] > 80                # 16 bits: about 6 dB per bit


def test_report_prints_mean_std_and_the_papers_rows():
    results = [{"table": None, "estimator": "fp32", "model": "lenet5", "seed": s, "acc": 97.0 + s, "ms_per_step": 5.0}
               for s in range(2)]
    results += [{"table": "1", "estimator": "hindsight", "model": "lenet5", "seed": s, "acc": 96.0 + 2 * s,
                 "ms_per_step": 7.0, "clipped": 0.001, "sqnr_db": 30.0} for s in range(2)]
    text = re_exp.report(results, ["1"], ["lenet5"])
    row = next(ln for ln in text.splitlines() if ln.startswith("| In-hindsight"))
    assert "59.46 ± 0.71" in row and "97.00 ± 1.41 (n=2)" in row and "0.100" in row and "30.0" in row
    assert "| Current min-max | no | 59.14 ± 0.23 | — | — | — |" in text       # not run: dashes
    timing = {"fp32": 5.0, **{f"1-{e}": 6.0 for e in re_exp.ESTIMATORS}}
    assert "| DSGC | 6.0 (1.20×) |" in re_exp.timing_table(timing, ["1"])


def _fake_folder(root: Path, train: int = 80, val: int = 9) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            d = root / split / f"c{i % 3}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _protocol_commands() -> list[str]:
    text = (DOCS / "paper_protocol.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    commands = [c.replace("\\\n", " ") for b in blocks for c in b.replace("\\\n", " ").splitlines()]
    return [c.strip() for c in commands if c.strip().startswith("qcompile train")]


@pytest.mark.slow
def test_paper_protocol_commands_start(tmp_path):
    """Every `qcompile train` command of docs/paper_protocol.md runs 10 steps on a small image folder."""
    data = _fake_folder(tmp_path / "data")
    commands = _protocol_commands()
    assert len(commands) == 2
    for i, command in enumerate(commands):
        argv = shlex.split(command)[1:] + ["--data", str(data), "--epochs", "1", "--batch-size", "8", "--workers", "0",
                                           "--device", "cpu", "--no-progress", "--out", str(tmp_path / f"run{i}")]
        assert cli.main(argv) == 0, command
        metrics = (tmp_path / f"run{i}" / "metrics.csv").read_text().splitlines()
        assert metrics[1].startswith("1,10,")                              # one epoch of 10 steps

"""`qcompile train` / `qcompile export`: the parts (sampler, schedule, parameter groups, configs),
real runs from disk, exact resume after SIGKILL, torchrun, and every user error as one line."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qcompile
from qcompile.errors import CheckpointError
from qcompile.tools import checkpoint, cli, trainer
from qcompile.tools.data import EpochSampler, SeededItems, load_datasets
from qcompile.tools.run_config import TrainConfig, load_run_file

PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _env() -> dict:
    """This process's environment with its torch thread count: float results depend on it, and some test
    modules set it at import."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _cli(*args, timeout=600):
    return subprocess.run([PY, "-m", "qcompile", *args], capture_output=True, text=True, timeout=timeout, env=_env())


def _files(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


TINY_DATA = '''
import torch
from torch.utils.data import TensorDataset

def tiny():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 28, 28, generator=g)
    y = torch.arange(96) % 4
    x[:, 0, :4, :4] += y.view(-1, 1, 1).float()   # learnable
    train, val = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
    train.classes = val.classes = ["a", "b", "c", "d"]
    return train, val
'''


@pytest.fixture
def tiny_data(tmp_path):
    f = tmp_path / "tiny_data.py"
    f.write_text(TINY_DATA)
    return f"{f}:tiny"


def _tiny_run(tiny_data, out, **changes):
    cfg = TrainConfig(**{"model": "models:lenet5", "data": tiny_data, "epochs": 1, "batch_size": 32,
                         "calibration_batches": 1, **changes})
    return trainer.run(cfg, qcompile.QConfig(grad_bits=8), out, log=lambda s: None, progress_bar=False)


# ---- parts ------------------------------------------------------------------------------------------
def test_epoch_sampler_splits_global_batches_over_ranks_and_resumes_mid_epoch():
    full = EpochSampler(100, 16, seed=3)
    keys = list(full)
    assert full.steps_per_epoch == 6 and len(keys) == 96 and len({k for k, _ in keys}) == 96   # last 4 dropped
    ranks = [EpochSampler(100, 16, seed=3, rank=r, world=2) for r in range(2)]
    per_rank = [list(s) for s in ranks]
    for step in range(6):      # global batch k = rank 0's share then rank 1's
        assert per_rank[0][8 * step:8 * step + 8] + per_rank[1][8 * step:8 * step + 8] == keys[16 * step:16 * step + 16]
    full.start(0, 4)
    assert list(full) == keys[64:]
    full.start(1)
    assert [k for k, _ in full] != [k for k, _ in keys] and all(e == 1 for _, e in full)
    with pytest.raises(ValueError, match="not divisible"):
        EpochSampler(100, 15, 0, 0, 2)


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = load_datasets(str(tmp_path), image_size=24, augment=True)
    items = SeededItems(data.train, seed=5, random_transforms=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = items[(2, 0)][0]
    assert torch.equal(torch.get_rng_state(), before)           # the caller's generator is untouched
    torch.rand(7)
    assert torch.equal(items[(2, 0)][0], a)                      # same key, same crop, whatever ran before
    assert not torch.equal(items[(2, 1)][0], a)                  # another epoch, another crop
    loader = torch.utils.data.DataLoader(items, batch_size=2, sampler=[(i, 0) for i in range(4)], num_workers=2)
    assert torch.equal(torch.cat([x for x, _ in loader])[2], a)  # a worker process draws the same


def test_schedule_and_parameter_groups():
    steps = 10
    cos = TrainConfig(epochs=3)
    assert trainer.lr_factor(cos, 0, steps) == 1.0 and abs(trainer.lr_factor(cos, 15, steps) - 0.5) < 1e-12
    step = TrainConfig(epochs=3, schedule="step", milestones=(1, 2), gamma=0.1)
    assert [trainer.lr_factor(step, s, steps) for s in (9, 10, 19, 20)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert trainer.lr_factor(TrainConfig(schedule="constant"), 25, steps) == 1.0

    cfg = TrainConfig(model="torchvision:mobilenet_v2", lr=0.1, weight_decay=1e-4, no_decay_norm=True,
                      lr_groups={"depthwise": 0.01, "classifier.*": 0.05})
    torch.manual_seed(0)
    model = qcompile.models.get("torchvision:mobilenet_v2", num_classes=10)
    norm, depthwise = trainer.norm_and_depthwise(model)
    assert "features.2.conv.1.0.weight" in depthwise and "features.1.conv.0.0.weight" in depthwise
    assert "features.2.conv.0.0.weight" not in depthwise and len(depthwise) == 17      # one per inverted residual
    assert "features.2.conv.1.1.weight" in norm and "features.2.conv.1.1.bias" in norm
    setup = trainer.Setup(cfg, None, model, None, (3, 32, 32), trainer.Processes(), norm, depthwise)
    groups = trainer.parameter_groups(setup)
    by_param = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert by_param[id(params["features.2.conv.1.0.weight"])]["lr"] == 0.01
    assert by_param[id(params["classifier.1.weight"])]["lr"] == 0.05
    assert by_param[id(params["features.2.conv.1.1.weight"])]["weight_decay"] == 0.0      # a BatchNorm's γ
    pointwise = by_param[id(params["features.2.conv.0.0.weight"])]
    assert (pointwise["lr"], pointwise["weight_decay"]) == (0.1, 1e-4)
    assert sum(len(g["params"]) for g in groups) == len(params)
    with pytest.raises(ValueError, match="selects no parameter"):
        trainer.parameter_groups(trainer.Setup(cfg.replace(lr_groups={"nothing.*": 0.1}), None, model, None, (),
                                               trainer.Processes()))


def test_prepare_finds_norm_and_depthwise_parameters_of_the_float_model():
    cfg = TrainConfig(model="models:lenet5_bn", data="mnist5k")
    setup = trainer.prepare(cfg, qcompile.QConfig(), trainer.Processes())
    assert setup.no_decay == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "bn3.weight", "bn3.bias"}
    assert setup.no_decay <= dict(setup.model.named_parameters()).keys()      # names survive compilation
    assert setup.input_shape == (1, 28, 28) and setup.data.classes == [str(c) for c in range(10)]


def test_train_config_and_run_file_validation(tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="needs milestones"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="TrainConfig.opt_momentum"):
        TrainConfig(opt_momentum=1.5)
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"epochz": 3})
    f = tmp_path / "run.toml"
    f.write_text('[train]\nepochs = 3\nmilestones = [1, 2]\nschedule = "step"\n[qcompile]\ngrad_bits = 8\n')
    train, q = load_run_file(f)
    assert TrainConfig.from_dict(train).milestones == (1, 2) and qcompile.QConfig.from_dict(q).grad_bits == 8
    f.write_text("[trian]\nepochs = 3\n")
    with pytest.raises(ValueError, match="unknown top-level keys"):
        load_run_file(f)


def test_atomic_write_keeps_the_previous_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.bin"
    checkpoint.write_atomic(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")
    with pytest.raises(OSError):
        checkpoint.write_atomic(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


# ---- user errors: one line, nothing half-written ------------------------------------------------------
def _one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    return err


def test_user_errors_are_one_line_and_leave_nothing_half_written(tmp_path, tiny_data, capsys):
    run_dir = tmp_path / "run"
    _tiny_run(tiny_data, run_dir)
    assert (run_dir / "last.pt").is_file() and (run_dir / "best.pt").is_file()
    capsys.readouterr()

    # a missing data folder: no run directory is created
    missing = tmp_path / "no_such_data"
    assert cli.main(["train", "models:lenet5", "--data", str(missing), "--out", str(tmp_path / "new")]) == 2
    _one_error_line(capsys, "no such directory", str(missing))
    assert not (tmp_path / "new").exists()

    # an unknown flag
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "models:lenet5", "--out", str(tmp_path / "new"), "--learning-rate", "0.1"])
    assert exc.value.code == 2
    _one_error_line(capsys, "unrecognized arguments: --learning-rate")

    # an existing run directory is not overwritten
    before = _files(run_dir)
    assert cli.main(["train", "models:lenet5", "--data", tiny_data, "--out", str(run_dir)]) == 2
    _one_error_line(capsys, "exists and is not empty", "--resume")
    assert _files(run_dir) == before

    # a truncated checkpoint: a clear error, and the run directory unchanged
    blob = (run_dir / "last.pt").read_bytes()
    (run_dir / "last.pt").write_bytes(blob[:len(blob) // 2])
    before = _files(run_dir)
    assert cli.main(["train", "--resume", str(run_dir)]) == 2
    _one_error_line(capsys, "truncated or corrupt", "last.pt")
    assert _files(run_dir) == before
    assert cli.main(["export", str(run_dir / "last.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    _one_error_line(capsys, "truncated or corrupt")
    assert not (tmp_path / "m.onnx").exists()
    (run_dir / "last.pt").write_bytes(blob)

    # a checkpoint of another model: nothing is loaded
    other = tmp_path / "other"
    trainer.run(TrainConfig(model="models:lenet5_bn", data=tiny_data, epochs=1, batch_size=32, calibration_batches=1),
                qcompile.QConfig(grad_bits=8), other, log=lambda s: None, progress_bar=False)
    shutil.copy(other / "last.pt", run_dir / "last.pt")
    before = _files(run_dir)
    assert cli.main(["train", "--resume", str(run_dir)]) == 2
    _one_error_line(capsys, "belongs to another run", "train.model")
    assert _files(run_dir) == before
    qm = qcompile.compile(qcompile.models.get("models:lenet5", num_classes=4), torch.randn(2, 1, 28, 28))
    with pytest.raises(CheckpointError, match="does not match this model: missing"):
        qm.load_checkpoint(_state_dict_file(other / "last.pt", tmp_path / "state.pt"))

    # --resume with other options
    assert cli.main(["train", "--resume", str(other), "--epochs", "3"]) == 2
    _one_error_line(capsys, "takes no MODEL", "--epochs")


def _state_dict_file(ckpt, path):
    torch.save(checkpoint.read(ckpt)["model"], path)
    return path


def test_a_finished_run_resumes_to_the_same_result(tmp_path, tiny_data):
    first = _tiny_run(tiny_data, tmp_path / "run")
    threads, log = torch.get_num_threads(), []
    torch.set_num_threads(threads + 1)
    try:
        again = trainer.resume(tmp_path / "run", log=log.append, progress_bar=False)
    finally:
        torch.set_num_threads(threads)
    assert again.metrics == first.metrics and again.best_acc == first.best_acc
    assert any(f"the run used {threads} thread(s)" in s and "not be bit-identical" in s for s in log)


def test_nonfinite_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoint(tmp_path, tiny_data):
    with pytest.raises(qcompile.NonFiniteError, match=r"epoch 1, (step \d+|held-out evaluation): .*last.pt holds its last checkpoint"):
        _tiny_run(tiny_data, tmp_path / "run", lr=1e30, epochs=3, checkpoint_every=1)
    ckpt = checkpoint.read(tmp_path / "run" / "last.pt")              # the last good step's checkpoint
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ---- real runs (subprocesses: the commands a user types) ------------------------------------------------
@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory):
    """MNIST-5k's 4,000 training and 1,000 held-out digits written as PNG files, one folder per class."""
    from qcompile.tools.data import mnist_5k, write_mnist_5k_folder
    root = write_mnist_5k_folder(tmp_path_factory.mktemp("mnist_png"))
    split = mnist_5k()
    folder = load_datasets(str(root), channels=1)                 # read back: MNIST-5k's own tensors
    for j in range(0, len(folder.val), 97):
        path, label = folder.val.samples[j]
        i = int(Path(path).stem)
        assert label == int(split.y_test[i])
        assert torch.allclose(folder.val[j][0], split.x_test[i], atol=1e-5)
    return root


@pytest.mark.slow
def test_train_from_an_image_folder_and_export_agree_with_the_python_api(tmp_path, mnist_folder):
    flags = ["--data", str(mnist_folder), "--epochs", "2", "--grad-bits", "8", "--no-progress"]
    proc = _cli("train", "models:lenet5", *flags, "--out", str(tmp_path / "cli"))
    assert proc.returncode == 0, proc.stderr
    assert "image folder" in proc.stdout and "4000 train / 1000 val images, 10 classes, 28x28, 1 channel" in proc.stdout
    cfg = TrainConfig(model="models:lenet5", data=str(mnist_folder), epochs=2)
    api = trainer.run(cfg, qcompile.QConfig(grad_bits=8), tmp_path / "api", log=lambda s: None, progress_bar=False)
    cli_metrics = checkpoint.read(tmp_path / "cli" / "last.pt")["metrics"]
    keys = ("step", "train_loss", "train_acc", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in cli_metrics] == [[r[k] for k in keys] for r in api.metrics]
    assert f"acc {api.metrics[-1]['val_acc']:.2f}%" in proc.stdout
    assert api.best_acc > 90.0
    assert (tmp_path / "cli" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cli" / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,lr,train_loss")

    onnx_path, c_dir = tmp_path / "model.onnx", tmp_path / "c"
    proc = _cli("export", str(tmp_path / "cli" / "best.pt"), "--onnx", str(onnx_path), "--c", str(c_dir), "--build")
    assert proc.returncode == 0, proc.stderr
    line = next(s for s in proc.stdout.splitlines() if s.startswith("held-out accuracy"))
    accs = dict((name.strip(), float(v.rstrip("%"))) for name, v in
                (part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(" | ")))
    assert accs["PyTorch"] == api.best_acc                    # the trained graph, as the training run measured it
    assert accs["reference"] == accs["C"]                      # bit-exact C
    assert abs(accs["onnxruntime (qdq)"] - accs["reference"]) <= 0.2 and abs(accs["PyTorch"] - accs["C"]) <= 0.2
    assert "C vs reference: 0" in proc.stdout or "reference vs C: 0" in proc.stdout
    import onnxruntime
    onnxruntime.InferenceSession(str(onnx_path))               # the file on disk loads


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    flags = ["models:lenet5_bn", "--data", "mnist5k", "--epochs", "2", "--batch-size", "64", "--checkpoint-every", "5",
             "--grad-bits", "8", "--acc-bits", "16", "--tile", "64", "--log-barrier", "true", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([PY, "-m", "qcompile", "train", *flags, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    at = checkpoint.read(killed / "last.pt")["progress"]
    assert at["epoch"] == 0 and 0 < at["step_in_epoch"] < 62      # killed in the middle of the first epoch

    log = []
    resumed = trainer.resume(killed, log=log.append, progress_bar=False)
    assert any(f"({at['step_in_epoch']} into the epoch)" in s for s in log)
    assert not any("not be bit-identical" in s for s in log)
    train, qconfig = trainer.configs_of(killed)
    whole = trainer.run(train, qconfig, tmp_path / "whole", log=lambda s: None, progress_bar=False)
    a, b = checkpoint.read(killed / "last.pt"), checkpoint.read(tmp_path / "whole" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    estimator = [k for k in a["model"] if ".estimator." in k]
    assert estimator and "regularizers.log_barrier.step" in a["model"] and "conv1.accumulator.events_train" in a["model"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["val_acc"] for r in resumed.metrics] == [r["val_acc"] for r in whole.metrics]
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in whole.metrics]


@pytest.mark.slow
def test_torchrun_two_processes_agree_and_only_rank_0_writes(tmp_path):
    flags = ["models:lenet5_bn", "--data", "mnist5k", "--epochs", "2", "--batch-size", "32", "--grad-bits", "8",
             "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "qcompile", "train", *flags,
                           "--out", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("epoch 1/2 ") == 1 and proc.stdout.count("ranks agree: yes") == 2   # rank 0 prints
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.csv",
                                                                    "run.json", "summary.txt"]
    ddp = checkpoint.read(tmp_path / "ddp" / "last.pt")
    assert ddp["run"]["world"] == 2 and len(ddp["rng"]["torch"]) == 2
    assert [r["ranks_agree"] for r in ddp["metrics"]] == [True, True]
    single = trainer.run(TrainConfig(model="models:lenet5_bn", data="mnist5k", epochs=2, batch_size=32),
                         qcompile.QConfig(grad_bits=8), tmp_path / "single", log=lambda s: None, progress_bar=False)
    # same global batch, same data order; the ranks differ from one process in their rounding streams only
    assert abs(ddp["metrics"][-1]["val_acc"] - single.final_acc) <= 1.5, (ddp["metrics"], single.metrics)

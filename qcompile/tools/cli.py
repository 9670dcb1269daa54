"""Command line: `qcompile demo | train | export | draw | report | emit-c`.

Every error a user can cause (a bad flag or value, missing data, a corrupt or mismatched
checkpoint) is one line on stderr naming what and where, and exit status 2."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

import qcompile
from qcompile.errors import QCompileError
from qcompile.tools import demo
from qcompile.tools.analysis import memory_traffic
from qcompile.tools.deploy import emit_c
from qcompile.tools.model_spec import (
    add_config_arguments,
    config_changes,
    config_from_args,
    flag_value,
    load_model,
    parse_shape,
)
from qcompile.tools.run_config import TrainConfig, load_run_file


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `qcompile train: error: unrecognized arguments: --x (see --help)`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(command: str, exc: Exception) -> int:
    """Print `exc` as one line (rank 0 only under torchrun) and return exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        text = " ".join(str(exc).split())
        print(f"qcompile {command}: {type(exc).__name__}: {text}", file=sys.stderr)
    return 2


def _demo(args) -> int:
    demo.run(epochs=args.epochs, seed=args.seed)
    return 0


# ---- train / export ---------------------------------------------------------------------------
_TRAIN_FLAGS = [f for f in dataclasses.fields(TrainConfig) if f.name != "model"]


def _train_value(name: str, text: str):
    """A TrainConfig flag's value: milestones '30,60'; lr_groups 'GLOB=LR,...'; else as QConfig flags."""
    if name == "milestones":
        try:
            return tuple(int(p) for p in text.split(",") if p)
        except ValueError:
            raise ValueError(f"--milestones {text!r}: write comma-separated epochs, e.g. 30,60") from None
    if name == "lr_groups":
        groups = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.rpartition("=")
            try:
                groups[key] = float(value)
            except ValueError:
                sep = ""
            if not sep or not key:
                raise ValueError(f"--lr-groups {text!r}: write GLOB=LR pairs, e.g. 'features.*=0.01,depthwise=0.01'")
        return groups
    return flag_value(name, text)


def _run_configs(args):
    """(TrainConfig, QConfig): the run file's [train]/[qcompile] tables, then every flag given."""
    train, qfields = load_run_file(args.config) if args.config else ({}, {})
    train["model"] = args.model
    train.update({f.name: _train_value(f.name, v) if isinstance(v, str) else v
                  for f in _TRAIN_FLAGS if (v := getattr(args, f"tr_{f.name}")) is not None})
    qconfig = qcompile.QConfig.from_dict(qfields)
    changes = config_changes(args)
    return TrainConfig.from_dict(train), qconfig.replace(**changes) if changes else qconfig


def _train(args) -> int:
    from qcompile.tools import trainer
    try:
        if args.resume:
            given = [f"--{f.name.replace('_', '-')}" for f in _TRAIN_FLAGS if getattr(args, f"tr_{f.name}") is not None]
            given += [f"--{k.replace('_', '-')}" for k in config_changes(args)]
            if args.model or args.out or args.config or given:
                raise ValueError(f"--resume {args.resume} takes no MODEL, --out, --config or other options "
                                 f"{given}: the run's configs are in {args.resume}/run.json")
            trainer.resume(args.resume, progress_bar=not args.no_progress)
        else:
            if not args.model or not args.out:
                raise ValueError("give MODEL and --out RUN_DIR (or --resume RUN_DIR)")
            train, qconfig = _run_configs(args)
            trainer.run(train, qconfig, args.out, progress_bar=not args.no_progress)
    except (ValueError, OSError, QCompileError) as exc:
        return _fail("train", exc)
    return 0


def _export(args) -> int:
    from qcompile.tools.export_run import export_checkpoint
    if args.build and not args.c:
        return _fail("export", ValueError("--build needs --c DIR (where the C runtime is written)"))
    try:
        export_checkpoint(args.checkpoint, args.onnx, args.format, args.c, args.build, args.limit)
    except (ValueError, OSError, QCompileError) as exc:
        return _fail("export", exc)
    return 0


def _add_train_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", help="torchvision:NAME, models:NAME or path/to/file.py:factory")
    p.add_argument("--out", metavar="RUN_DIR", help="new run directory (checkpoints, metrics.csv, curves.png)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch is printed anyway)")
    group = p.add_argument_group("training (flags override the run file's [train] table)")
    helps = {"data": "mnist5k, an image folder DIR (DIR/train, DIR/val) or path/to/file.py:factory",
             "batch_size": "global batch, split over torchrun's processes", "optimizer": "sgd or adamw",
             "opt_momentum": "SGD momentum / AdamW beta1", "schedule": "cosine, step or constant (per step)",
             "milestones": "epochs where schedule=step multiplies the lr by gamma, e.g. 30,60",
             "lr_groups": "per-parameter learning rates: 'GLOB=LR,...' (GLOB on parameter names, or depthwise)",
             "no_decay_norm": "no weight decay on BatchNorm/LayerNorm/GroupNorm parameters",
             "calibration_batches": "training batches to estimate ranges on before step 1",
             "image_size": "image folders: side in pixels (default: the first image's shorter side)",
             "augment": "image folders: RandomResizedCrop + horizontal flip in training",
             "checkpoint_every": "also checkpoint every N steps (0: every epoch only)",
             "baseline": "also train the float model, same init and protocol, in RUN_DIR/fp32",
             "device": "cpu or cuda"}
    for f in _TRAIN_FLAGS:
        flag, default = f"--{f.name.replace('_', '-')}", f.default if f.default is not dataclasses.MISSING \
            else f.default_factory()
        text = helps.get(f.name, f.name.replace("_", " ")) + f" (default {default!r})"
        if f.type == "bool":
            group.add_argument(flag, dest=f"tr_{f.name}", action="store_const", const=True, default=None, help=text)
        else:
            group.add_argument(flag, dest=f"tr_{f.name}", metavar="V", help=text)
    add_config_arguments(p, exclude=("seed",), config_help="run file: [train] and [qcompile] tables")


def _compiled(args):
    """(compiled MODEL, input shape); None after printing the error when an argument is wrong."""
    try:
        shape = parse_shape(args.input_shape)
        model = load_model(args.model)
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"qcompile {args.command}: {exc}", file=sys.stderr)
        return None, None
    return qcompile.compile(model, torch.randn(shape), config), shape


def _draw(args) -> int:
    qm, _ = _compiled(args)
    if qm is None:
        return 2
    passes = "all" if args.passes == "all" else args.passes.split(",")
    collapse = {"auto": "auto", "on": True, "off": False}[args.collapse]
    drawing = qcompile.draw(qm, args.out, passes=passes, format=args.format, prefix=args.prefix,
                            collapse=collapse, renderer=args.renderer)
    for name in drawing.passes:
        print(f"{name:<12} {drawing.svg.get(name) or drawing.dot[name]}")
    if drawing.html is not None:
        print(f"HTML: {drawing.html.resolve()}")
    return 0


def _report(args) -> int:
    qm, shape = _compiled(args)
    if qm is None:
        return 2
    traffic = memory_traffic(qm, shape, acc_bits=args.report_acc_bits)
    print(f"{args.model}, input {tuple(shape)}: forward memory traffic per layer, static (eq. 4) vs dynamic "
          "quantization (section 3.2)")
    print(traffic.table(markdown=args.markdown))
    print()
    print("backward memory traffic per layer: G_X and G_W matmuls, static vs dynamic gradient quantization")
    print(traffic.backward_table(markdown=args.markdown))
    print()
    for name, (static, dynamic, configured) in traffic.totals().items():
        print(f"total {name}: static {static / 1024:.1f} KB, dynamic {dynamic / 1024:.1f} KB "
              f"(+{100 * (dynamic / static - 1):.0f}%), as configured {configured / 1024:.1f} KB")
    return 0


def _emit_c(args) -> int:
    """compile MODEL, load a trained state_dict (or calibrate on random inputs), emit C, optionally build."""
    qm, shape = _compiled(args)
    if qm is None:
        return 2
    if args.checkpoint:
        qm.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    else:
        print(f"qcompile emit-c: no --checkpoint; calibrating on {args.calibration_batches} batch(es) of random "
              "normal inputs", file=sys.stderr)
        torch.manual_seed(0)
        qm.calibrate(torch.randn(shape) for _ in range(args.calibration_batches))
    module = emit_c(qm.eval(), args.out, name=args.name)
    print(module.summary())
    for path in module.files:
        print(path)
    if args.build:
        print(module.build(opt=args.opt))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcompile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train LeNet-5 on the embedded MNIST-5k digits, FP32 vs W8A8G8")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    p = sub.add_parser("train", help="train MODEL fully quantized on DATA: checkpoints, resume, torchrun")
    _add_train_arguments(p)
    p.set_defaults(func=_train)
    p = sub.add_parser("export", help="a run checkpoint → ONNX (and C), with every backend's held-out accuracy")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="RUN_DIR/best.pt or RUN_DIR/last.pt")
    p.add_argument("--onnx", metavar="FILE.onnx", help="write the ONNX model here")
    p.add_argument("--format", default="qdq", choices=("qdq", "qop"), help="ONNX form (default qdq)")
    p.add_argument("--c", metavar="DIR", help="write the C runtime here")
    p.add_argument("--build", action="store_true", help="build the C runtime with gcc and run it on the held-out set")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out samples only")
    p.set_defaults(func=_export)
    model_help = "torchvision:NAME, models:NAME or path/to/file.py:factory"
    p = sub.add_parser("draw", help="compile MODEL and draw the graph after every pass (DOT, SVG, one HTML page)")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,64,64")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--passes", default="all", help="'all' or comma-separated pass names")
    p.add_argument("--format", default="html", choices=("dot", "svg", "html"))
    p.add_argument("--prefix", default=None, help="draw only nodes under this module path")
    p.add_argument("--collapse", default="auto", choices=("auto", "on", "off"), help="collapse repeated blocks")
    p.add_argument("--renderer", default="auto", choices=("auto", "graphviz", "layered"))
    add_config_arguments(p)
    p.set_defaults(func=_draw)
    p = sub.add_parser("report", help="compile MODEL and report per-layer memory traffic, static vs dynamic")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--input-shape", required=True, help="input shape, e.g. 1,3,224,224")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--report-acc-bits", type=int, default=None,
                   help="accumulator width for the dynamic cost (default: the layer's, else acc_bits, else 32)")
    add_config_arguments(p)
    p.set_defaults(func=_report)
    p = sub.add_parser("emit-c", help="compile MODEL and generate its pure-integer C99 runtime (jinja2 → C → gcc)")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--input-shape", required=True, help="input shape with batch, e.g. 1,3,32,32")
    p.add_argument("--out", required=True, help="output directory for <name>.h/.c, main.c, Makefile")
    p.add_argument("--name", default="model", help="C prefix and file name (default: model)")
    p.add_argument("--checkpoint", default=None, help="trained qm.state_dict() saved with torch.save")
    p.add_argument("--calibration-batches", type=int, default=2,
                   help="without --checkpoint: random normal batches to calibrate on (default 2)")
    p.add_argument("--build", action="store_true", help="also compile it with gcc")
    p.add_argument("--opt", default="-O2", help="optimisation flags for --build (default -O2)")
    add_config_arguments(p)
    p.set_defaults(func=_emit_c)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

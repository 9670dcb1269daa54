"""Command line: `qcompile demo | draw | report | emit-c`."""
from __future__ import annotations

import argparse
import sys

import torch

import qcompile
from qcompile.tools import demo
from qcompile.tools.analysis import memory_traffic
from qcompile.tools.deploy import emit_c
from qcompile.tools.model_spec import add_config_arguments, config_from_args, load_model, parse_shape


def _demo(args) -> int:
    demo.run(epochs=args.epochs, seed=args.seed)
    return 0


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
    print(f"total: static {traffic.static_bytes / 1024:.1f} KB, dynamic {traffic.dynamic_bytes / 1024:.1f} KB "
          f"(+{100 * traffic.delta:.0f}%), as configured {traffic.configured_bytes / 1024:.1f} KB")
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
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train LeNet-5 on the embedded MNIST-5k digits, FP32 vs W8A8G8")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
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

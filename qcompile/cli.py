"""Command line: `qcompile demo` (and the subcommands later issues add)."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from qcompile import demo
    demo.run(epochs=args.epochs, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train LeNet-5 on the embedded MNIST-5k digits, FP32 vs W8A8G8")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

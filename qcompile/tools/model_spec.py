"""MODEL arguments of the command line: `torchvision:NAME`, `models:NAME` or `path/to/file.py:factory`
(`import_factory` also serves DATA's `file.py:factory`), and QConfig fields as flags.

Invariant: `load_model(spec)` returns a fresh nn.Module or raises ValueError naming the
spec and what to change; `parse_shape("1,3,64,64")` returns a tuple of positive ints.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import tomllib
from pathlib import Path

from torch import nn

from qcompile.config import QConfig
from qcompile.models import get


def import_factory(spec: str, what: str = "model"):
    """The callable `factory` that a 'path/to/file.py:factory' spec names (the file imported);
    ValueError naming the spec (`what` it is for) and what to change."""
    source, sep, name = spec.rpartition(":")
    path = Path(source)
    if not sep or not name or path.suffix != ".py":
        raise ValueError(f"{what} {spec!r}: expected 'path/to/file.py:factory'")
    if not path.is_file():
        raise ValueError(f"{what} {spec!r}: file {str(path)!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"qcompile_user_{what}_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ValueError(f"{what} {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"{what} {spec!r}: {path} has no callable {name!r}; callables there: {public}")
    return factory


def load_model(spec: str, if_accepted: dict | None = None, **kwargs) -> nn.Module:
    """The model a spec names; a file spec calls `factory(**kwargs)` from that Python file. `if_accepted`:
    further keyword arguments, passed only where the factory takes them (every `models:` / `torchvision:`
    model takes `num_classes`)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ValueError(f"model {spec!r}: use 'torchvision:NAME', 'models:NAME' or 'path/to/file.py:factory'")
    if source in ("torchvision", "models"):
        return get(spec, **(if_accepted or {}), **kwargs)
    if Path(source).suffix != ".py":
        raise ValueError(f"model {spec!r}: {source!r} is neither 'torchvision', 'models' nor a .py file")
    factory = import_factory(spec, "model")
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    model = factory(**{k: v for k, v in (if_accepted or {}).items() if takes_any or k in params}, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: {name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,64,64' (or '1x3x64x64') -> (1, 3, 64, 64)."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"input shape {text!r}: write comma-separated integers, e.g. 1,3,224,224") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input shape {text!r}: needs at least one dimension, all positive")
    return shape


# ---- config options as command-line flags ------------------------------------------------
_NOT_FLAGS = ("overrides",)


def add_config_arguments(parser, exclude: tuple[str, ...] = (),
                         config_help: str = "QConfig fields, top level or under [qcompile]") -> None:
    """`--config file.toml` and one `--FIELD-NAME VALUE` flag per QConfig field but `exclude` (TOML
    syntax for the value: 4, 0.9, true, "running", [-1.0, 1.0]; bare words are strings; none = None)."""
    group = parser.add_argument_group("quantization config (flags override --config)")
    group.add_argument("--config", metavar="FILE.toml", help=config_help)
    for f in dataclasses.fields(QConfig):
        if f.name in _NOT_FLAGS or f.name in exclude:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", metavar="V",
                           help=f"default {default!r}" + (" (comma-separated)" if f.name == "leaf_modules" else ""))


def flag_value(name: str, text: str):
    if name == "leaf_modules":
        return tuple(p for p in text.split(",") if p)
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_changes(args) -> dict:
    """{field: value} of every QConfig flag given on the command line."""
    return {k[4:]: flag_value(k[4:], v) for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def config_from_args(args):
    """The QConfig of `--config` (or the defaults) with every given flag replacing its field."""
    config = QConfig.from_toml(args.config) if getattr(args, "config", None) else QConfig()
    changes = config_changes(args)
    return config.replace(**changes) if changes else config

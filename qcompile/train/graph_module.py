"""QuantizedGraphModule: the trainable fully quantized graph `qcompile.compile` returns.

It is a torch.fx.GraphModule (train it with any optimizer, loop or DDP) that also keeps
the config it was compiled with and the graph after every pass (`pass_snapshots`), and
offers `calibrate`, `regularization`, `summary` and switches for quantization.
All quantizer and estimator state is in buffers: `state_dict()` alone resumes training.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from qcompile.config import QConfig
from qcompile.errors import CheckpointError
from qcompile.train.quantizers import BiasQuant, Quantizer
from qcompile.train.log_barrier import LogBarrier
from qcompile.train.tiled import NarrowAccOp


@dataclass
class PassSnapshot:
    """The graph as a pass left it (a copy: node.meta included, modules not)."""
    name: str
    graph: fx.Graph


def copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    val_map: dict = {}
    out = new.graph_copy(graph, val_map)
    new.output(out)
    return new


def check_state_dict(own: dict, state, where: str) -> None:
    """CheckpointError unless `state` is a dict with exactly `own`'s keys and shapes (nothing is copied)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds a {type(state).__name__}, not a state_dict")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{where} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape "
            f"{wrong[:5]} (compile the same model with the same config)")


class QuantizedGraphModule(fx.GraphModule):
    def __init__(self, root, graph, class_name: str = "QuantizedGraphModule"):
        super().__init__(root, graph, class_name)
        self.config: QConfig = getattr(root, "config", QConfig())
        self.pass_snapshots: list[PassSnapshot] = list(getattr(root, "pass_snapshots", []))
        if not hasattr(self, "regularizers"):
            self.regularizers = nn.ModuleDict()

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        res.config = self.config
        res.pass_snapshots = copy.deepcopy(self.pass_snapshots, memo)
        return res

    def snapshot(self, name: str) -> None:
        self.pass_snapshots.append(PassSnapshot(name, copy_graph(self.graph)))

    # ---- quantizers -------------------------------------------------------------
    def quantizers(self) -> list[tuple[str, Quantizer]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, Quantizer)]

    def switches(self) -> list[nn.Module]:
        """Every module quantization can be turned off on: quantizers, bias roundings and accumulator
        ops (each has its own `enabled`: an accumulator op off is the plain float op; it does not
        look at its operands' quantizers). Quantizers the config keeps float (`float_by_config`) are not switches."""
        return [m for m in self.modules() if isinstance(m, (Quantizer, BiasQuant, NarrowAccOp))
                and not getattr(m, "float_by_config", False)]

    def set_quantization(self, enabled: bool) -> None:
        """Turn every switch (`switches()`) on or off (off: tensors pass through untouched, accumulator
        ops run the float op)."""
        for q in self.switches():
            q.enabled = enabled

    @contextlib.contextmanager
    def quantization_disabled(self):
        states = [(q, q.enabled) for q in self.switches()]
        self.set_quantization(False)
        try:
            yield self
        finally:
            for q, state in states:
                q.enabled = state

    def seed_rounding(self, seed: int, device=None) -> None:
        """Make every stochastic-rounding quantizer draw from one generator on `device` (default CPU)
        seeded with `seed`: from here on the dither depends on `seed` and the draws since, nothing
        else (reseeding before every step makes it a function of what the seed is derived from)."""
        device = torch.device(device or "cpu")
        gen = getattr(self, "_rounding_generator", None)
        if gen is None or gen.device != device:
            gen = self._rounding_generator = torch.Generator(device)
        gen.manual_seed(seed)
        for _, q in self.quantizers():
            if q.stochastic:
                q.generator = gen

    @torch.no_grad()
    def calibrate(self, batches) -> int:
        """Run `batches` (tensors or tuples of tensors) with estimators updating and quantization
        off (the paper's calibration step). Returns the number of batches seen. The module's
        train/eval mode is kept: in train mode BatchNorm statistics update as in any forward."""
        observers = [q for _, q in self.quantizers()]
        count = 0
        with self.quantization_disabled():
            for q in observers:
                q.observing = True
            try:
                for batch in batches:
                    args = batch if isinstance(batch, (tuple, list)) else (batch,)
                    self(*args)
                    count += 1
            finally:
                for q in observers:
                    q.observing = False
        return count

    def save_checkpoint(self, path) -> None:
        """Write `state_dict()` (parameters and every quantizer/estimator buffer) to `path`."""
        torch.save(self.state_dict(), path)

    def load_checkpoint(self, path) -> None:
        """Load a checkpoint written by `save_checkpoint` (with weights_only=True: nothing is
        unpickled but tensors). Keys and shapes are checked before anything is copied, so a
        bad checkpoint raises and leaves the module exactly as it was."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(exc).__name__}: {exc}") from exc
        check_state_dict(self.state_dict(), state, f"checkpoint {str(path)!r}")
        self.load_state_dict(state)

    def regularization(self) -> torch.Tensor:
        """Sum of the loss terms the `regularize` pass registered (0 when there are none).

        A term that a node of the graph computes (the log barrier, `LogBarrier.take()`) is the value
        of the last training forward, handed over once (one term per training forward; 0 when it
        was taken already); the others are computed here."""
        terms = [term.take() if isinstance(term, LogBarrier) else term() for term in self.regularizers.values()]
        if not terms:
            p = next(self.parameters(), None)
            return torch.zeros((), device=p.device if p is not None else None)
        return torch.stack(terms).sum()

    def summary_rows(self) -> list[dict]:
        rows = []
        for name, q in self.quantizers():
            est = q.estimator
            init = bool(est.initialized)
            rows.append({
                "quantizer": name, "layer": q.layer, "kind": q.kind, "bits": q.bits,
                "estimator": est.name, "static": est.static, "float": q.float_by_config,
                "lo": float(est.lo.min()) if init else None, "hi": float(est.hi.max()) if init else None,
                "nonfinite": int(est.nonfinite),
            })
        return rows

    def summary(self, file=None) -> str:
        """A table of every quantizer: node, kind, bits, estimator, static/dynamic, current range;
        then one line per submodule that has a `describe()` method (accumulator ops, fused BN...)."""
        header = f"{'quantizer':<44} {'kind':<10} {'bits':>4} {'estimator':<9} {'mode':<7} {'range':>24}"
        lines = [header, "-" * len(header)]
        for r in self.summary_rows():
            rng = f"[{r['lo']:.4g}, {r['hi']:.4g}]" if r["lo"] is not None else "(not yet seen)"
            if r["float"]:
                rng = "float (by config)"
            if r["nonfinite"]:
                rng += f" nonfinite={r['nonfinite']}"
            lines.append(f"{r['quantizer']:<44} {r['kind']:<10} {r['bits']:>4} {r['estimator']:<9} "
                         f"{'static' if r['static'] else 'dynamic':<7} {rng:>24}")
        sections = [(n, m.describe()) for n, m in self.named_modules()
                    if not isinstance(m, Quantizer) and callable(getattr(m, "describe", None))]
        if sections:
            lines += ["", "layers:"] + [f"{n:<44} {text}" for n, text in sections]
        text = "\n".join(lines)
        if file is not None:
            print(text, file=file)
        return text

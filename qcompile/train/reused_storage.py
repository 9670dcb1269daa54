"""`ReusedStorage`: an output's memory, kept by its producer and written again on its next call.

A weight-sized tensor made anew on every training step (the folded weight W·γ/σ) costs more than its
arithmetic: the allocator maps the memory afresh, every page faults in while it is written, and the
kernel that reads it next runs slower on it. An owner keeps one such output's storage and hands it
out again once nothing else holds it.

Invariant: the storage is handed out again only while its owner alone holds it (no tensor anyone else
can see shares it), so a tensor already returned never changes; otherwise a fresh one is made. Not for
two threads calling one owner at once.
"""
from __future__ import annotations

import torch


class ReusedStorage:
    """One output's storage, reused from call to call (see the module docstring)."""

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def empty_like(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor of `like`'s shape, strides, dtype and device: the kept storage where
        nothing else holds it (the count 2 is the kept tensor and this look-up), else a fresh one kept
        from now on."""
        buf = self._buffer
        if (buf is None or buf.shape != like.shape or buf.stride() != like.stride() or buf.dtype != like.dtype
                or buf.device != like.device or torch._C._storage_Use_Count(buf.untyped_storage()._cdata) > 2):
            buf = self._buffer = torch.empty_like(like)
        return torch.empty(0, dtype=buf.dtype, device=buf.device).set_(buf.untyped_storage(), 0, buf.shape,
                                                                      buf.stride())

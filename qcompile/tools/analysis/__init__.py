"""Analyses of a compiled graph (accumulator bounds, memory traffic)."""
from qcompile.tools.analysis.accumulators import accumulator_bounds
from qcompile.tools.analysis.memory import memory_traffic

__all__ = ["accumulator_bounds", "memory_traffic"]

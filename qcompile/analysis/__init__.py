"""Analyses of a compiled graph (accumulator bounds, memory traffic)."""
from .memory import memory_traffic
from .accumulators import accumulator_bounds

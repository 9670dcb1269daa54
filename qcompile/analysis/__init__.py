"""Analyses of a compiled graph (accumulator bounds, memory traffic)."""

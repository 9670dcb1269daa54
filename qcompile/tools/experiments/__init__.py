"""Experiment scripts whose tables and plots are in docs/ (run with python -m)."""

"""Plots and tables from runs' ``metrics.jsonl``, and the shared plot style."""

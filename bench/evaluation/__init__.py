"""Evaluation-only code for the benchmarks (never imported by the daemon or the engines)."""

"""Evaluation-only code for the benchmarks: models and measures that judge the served engines and are never
served themselves (so tuning and judging stay apart); never imported by the daemon or the engines."""

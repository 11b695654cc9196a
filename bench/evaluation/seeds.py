"""Per-seed results folded into mean, spread and extremes, and the worst case over a table of them."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable


def spread(values: list[float]) -> dict:
    """Mean, population std, min and max of one measure over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(runs: list[dict]) -> dict:
    """runs: [{"scenario": name, "results": {method: {field: number}}}] -> {scenario: {method: {field: spread}}}."""
    table: dict = {}
    for run in runs:
        for method, fields in run["results"].items():
            slot = table.setdefault(run["scenario"], {}).setdefault(method, {})
            for k, v in fields.items():
                if isinstance(v, (int, float)):
                    slot.setdefault(k, []).append(float(v))
    return {sc: {m: {k: spread(v) for k, v in f.items()} for m, f in methods.items()}
            for sc, methods in table.items()}


def pick(blocks: Iterable[dict], field: str, stat: str, scenarios: Callable[[str], bool],
         methods: Iterable[str]) -> list[tuple[float, str]]:
    """Every (value, "dataset/arch scenario method") for one field and statistic across benchmark blocks."""
    methods = set(methods)
    return [(fields[field][stat], f"{b['dataset']}/{b['arch']} {sc} {m}")
            for b in blocks for sc, ms in b["aggregate"].items() if scenarios(sc)
            for m, fields in ms.items() if m in methods and field in fields]

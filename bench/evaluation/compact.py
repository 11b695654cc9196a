"""The small JSON committed under bench/results/: a full benchmark report without per-seed and per-request detail.

Usage: python -m bench.evaluation.compact bench/out/classifier.json bench/results/classifier.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

#: Fields kept per scenario and method, each as [mean, std, min, max] over seeds.
FIELDS = ("forget_acc", "retain_acc", "test_acc", "mia_efficacy", "forget_conf", "test_conf", "avg_gap",
          "forget_acc_gap", "retain_acc_gap", "test_acc_gap", "mia_efficacy_gap", "seconds", "speedup_vs_retrain",
          "refresh_seconds", "speedup_incl_refresh", "step_lr", "epochs_run", "criterion_met")


def _round(stats: dict) -> list[float]:
    return [round(stats[k], 4) for k in ("mean", "std", "min", "max")]


def _rounded(checkpoints: dict) -> dict:
    return {step: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in cp.items()}
            for step, cp in checkpoints.items()}


def compact(report: dict) -> dict:
    blocks = []
    for b in report["blocks"]:
        table = {sc: {m: {f: _round(fields[f]) for f in FIELDS if f in fields} for m, fields in ms.items()}
                 for sc, ms in b["aggregate"].items()}
        seq = b.get("sequence")
        if seq:  # the gaps over seeds, and each seed's own without its request-by-request detail
            seq = {**{k: v for k, v in seq.items() if k != "per_seed"}, "checkpoints": _rounded(seq["checkpoints"]),
                   "per_seed": [{**{k: v for k, v in one.items() if k not in ("after_each", "retrain")},
                                 "checkpoints": _rounded(one["checkpoints"])} for one in seq.get("per_seed", [])]}
        of_means = {sc: {m: {k: round(v, 4) for k, v in gaps.items()} for m, gaps in ms.items()}
                    for sc, ms in b.get("gap_of_means", {}).items()}
        blocks.append({**{k: b[k] for k in ("dataset", "arch", "epochs", "alpha", "schedule", "seeds")},
                       "aggregate": table, "gap_of_means": of_means, "sequence": seq})
    return {"mode": report["mode"], "threads": report["threads"], "wall_seconds": round(report["wall_seconds"]),
            "stats": ["mean", "std", "min", "max"], "blocks": blocks, "summary": report["summary"]}


def main(argv=None) -> None:
    src, dst = (argv or sys.argv[1:])[:2]
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(compact(json.loads(Path(src).read_text())), indent=1)
    text = re.sub(r"\[\s+([-0-9.e,\s]+?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    Path(dst).write_text(text + "\n")  # one line per [mean, std, min, max]


if __name__ == "__main__":
    main()

"""bench/o3.py --quick end to end as a subprocess: a real tiny model, real adapters, JSON with a summary."""

from __future__ import annotations

from tests.bench.quick import run_quick

KEYS = {"su", "du", "reference_su", "reference_du", "rd_drop_points_oracle", "general_drop_points_oracle",
        "train_seconds_per_request", "requests_in_sequence", "max_orthogonality"}


def test_quick_bench_prints_a_sane_summary(tmp_path):
    result = run_quick("o3.py", tmp_path / "o3.json", "--cache", str(tmp_path / "cache"), timeout=600)
    assert result["params"]["threads"] == 1  # two stall each other on a busy 2-core machine
    s = result["summary"]
    assert KEYS <= s.keys()
    assert s["requests_in_sequence"] == len(result["sequence"]) >= 2
    for k in ("su", "du", "reference_su", "reference_du", "max_orthogonality"):
        assert 0.0 <= s[k] <= 1.0, k
    assert s["su_before"] >= 0.8  # the tiny model really learnt the facts first
    assert s["su"] <= s["su_before"] - 0.3  # and the adapters made it forget them
    assert s["rd_drop_points_oracle"] == 0.0 and s["general_drop_points_oracle"] == 0.0  # oracle = base elsewhere
    assert s["max_orthogonality"] < s["max_orthogonality_without_penalty"]
    assert 0 < s["train_seconds_per_request"] < 120
    # only adapters are left on disk, in PEFT layout
    adapters = list((tmp_path / "cache").rglob("adapter_model.safetensors"))
    assert len(adapters) == s["requests_in_sequence"]

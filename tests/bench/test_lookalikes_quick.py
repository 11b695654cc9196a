"""bench/lookalikes.py --quick as a subprocess: the router's support rule on the tuning side, JSON with a summary."""

from __future__ import annotations

from tests.bench.quick import run_quick


def test_quick_bench(tmp_path):
    result = run_quick("lookalikes.py", tmp_path / "lookalikes.json")
    s = result["summary"]
    assert s["default_min_support"] == result["params"]["default_min_support"]
    for name in ("single_fact", "people_3_phrasings", "people_1_phrasing"):
        rows = result[name]["by_min_support"]
        assert set(rows) == {f"{v:g}" for v in result["params"]["sweep"]}
        for row in rows.values():
            assert 0 <= row["held_out_hit"] <= 1 and 0 <= row["look_alike_false_activation"] <= 1
        # a higher support floor only ever turns adapters off
        fa = [rows[k]["look_alike_false_activation"] for k in sorted(rows, key=float)]
        assert fa == sorted(fa, reverse=True)
    with_support, without = (s[f"single_fact_look_alike_false_activation_{k}"] for k in ("default", "without_support"))
    assert with_support < without
    assert result["support"]["held_out_min"] > result["support"]["look_alike_max"]  # the gap the default sits in

"""bench/router.py --quick runs end to end as a subprocess and writes the summary a script can check."""

from tests.bench.quick import run_quick


def test_router_bench_quick(tmp_path):
    result = run_quick("router.py", tmp_path / "router.json")
    summary = result["summary"]
    assert result["torch_threads"] == 1  # two stall each other on a busy 2-core machine
    for key in ("auroc_min", "false_activation_rate", "su_routed", "du_routed", "rd_drop_points_routed",
                "routing_share_of_generation", "routing_cost_ratio_1000_vs_10"):
        assert key in summary, key
    assert 0.5 < summary["auroc_min"] <= 1.0
    assert 0.0 <= summary["false_activation_rate"] <= 1.0
    assert summary["routing_share_of_generation"] > 0
    # End to end on bench/o3.py's tiny run: measured, not left out, and routing spares the retained people
    # that "always on" damages.
    for key in ("su_routed", "du_routed"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["rd_drop_points_routed"] < summary["rd_drop_points_always_on"]
    assert result["end_to_end"]["routing"]["su"]["own_adapter"] == 1.0  # every named text reaches its adapter
    assert result["scaling"]["100"]["requests"] == 100

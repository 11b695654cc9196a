"""bench/chaos.py --quick runs end to end (real broker, daemon processes, kills, a broker restart, a full disk)
and meets every chaos target, computed from the ledger and the topics."""

from tests.bench.quick import run_quick


def test_chaos_bench_quick(tmp_path):
    result = run_quick("chaos.py", tmp_path / "chaos.json", timeout=400)
    s = result["summary"]
    assert (s["lost"], s["applied_twice"], s["valid_failed"], s["crashes_from_input"]) == (0, 0, 0, 0), s
    assert s["bad_dead_lettered_share"] == 1.0 and s["chain_consistent"] is True, s
    assert s["recovery_s_max"] is not None and s["recovery_s_max"] <= 30, s
    assert s["hostile_messages"] >= 300 and s["valid_requests"] >= 20 and s["kill9s"] >= 3
    assert result["episodes"]["broker_restart"]["requests_topic_partitions_after"] == 2
    disk = result["episodes"]["full_disk"]
    assert not disk["ran"] or disk["paused_after_s"] is not None  # the daemon paused instead of failing
    assert s["targets_met"] is True

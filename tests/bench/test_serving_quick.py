"""bench/serving.py --quick: a real daemon (embedded broker) and a real `unlearnd serve`, requests through Kafka,
questions through the OpenAI API, then restarts of serve, of the daemon with its broker, and a rollback."""

from tests.bench.quick import run_quick


def test_serving_bench_quick(tmp_path):
    result = run_quick("serving.py", tmp_path / "serving.json", "--cache", str(tmp_path / "cache"), timeout=400)
    s = result["summary"]
    assert s["requests_applied"] == result["params"]["requests"] == 2
    assert s["sent_routed_share"] == 1.0  # every phrasing a request sent reaches its adapter, in chat format
    assert s["general_false_activation"] == 0.0 and s["general_accuracy_drop_points"] == 0.0
    assert s["unrouted_outputs_identical"] is True  # the base model, token for token, wherever nothing routed
    assert s["restart_adapters_restored"] is True, result["restarts"]
    assert all(result["restarts"].values()) and len(result["restarts"]) == 8
    for request in result["requests"].values():  # result events report forgetting through the router
        assert request["status"] == "applied" and request["metrics"]["forget_routed_share"] == 1.0

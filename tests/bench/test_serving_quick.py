"""bench/serving.py --quick: a real daemon (embedded broker) and a real `unlearnd serve`, requests through Kafka,
questions through the OpenAI API, then restarts of serve, of the daemon with its broker, and a rollback."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_serving_bench_quick(tmp_path):
    out = tmp_path / "serving.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serving.py"), "--quick", "--out", str(out),
                           "--cache", str(tmp_path / "cache")], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result)[-1] == "summary" and json.loads(proc.stdout)["summary"] == result["summary"]
    s = result["summary"]
    assert s["requests_applied"] == result["params"]["requests"] == 2
    assert s["sent_routed_share"] == 1.0  # every phrasing a request sent reaches its adapter, in chat format
    assert s["general_false_activation"] == 0.0 and s["general_accuracy_drop_points"] == 0.0
    assert s["unrouted_outputs_identical"] is True  # the base model, token for token, wherever nothing routed
    assert s["restart_adapters_restored"] is True, result["restarts"]
    assert all(result["restarts"].values()) and len(result["restarts"]) == 8
    for request in result["requests"].values():  # result events report forgetting through the router
        assert request["status"] == "applied" and request["metrics"]["forget_routed_share"] == 1.0

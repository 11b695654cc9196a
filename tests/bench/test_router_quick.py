"""bench/router.py --quick runs end to end as a subprocess and writes the summary a script can check."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_router_bench_quick(tmp_path):
    out = tmp_path / "router.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "router.py"), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result)[-1] == "summary"
    summary = result["summary"]
    for key in ("auroc_min", "false_activation_rate", "su_routed", "du_routed", "rd_drop_points_routed",
                "routing_share_of_generation", "routing_cost_ratio_1000_vs_10"):
        assert key in summary, key
    assert 0.5 < summary["auroc_min"] <= 1.0
    assert 0.0 <= summary["false_activation_rate"] <= 1.0
    assert summary["routing_share_of_generation"] > 0
    assert result["scaling"]["100"]["requests"] == 100

"""bench/replicas.py --quick runs end to end (a real broker, a real PostgreSQL, 3 daemon replicas, kills, a replica
added mid-stream, a rolling restart) and meets issue 17's targets, computed from the ledger, the artifact store
and the results topic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres import find_bin_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(find_bin_dir() is None, reason="PostgreSQL is not installed: bash deploy/ci/install-tools.sh")
def test_replicas_bench_quick(tmp_path):
    out = tmp_path / "replicas.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "replicas.py"), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result)[-1] == "summary"
    s = result["summary"]
    assert (s["lost"], s["applied_twice"], s["forked_chains"], s["applied_not_in_head_lineage"],
            s["artifacts_unverified"]) == (0, 0, 0, 0, 0), result["checks"]
    assert s["unanswered_at_end"] == 0, result["checks"]
    assert s["kills"] >= 2 and s["replicas"] == 3 and s["requests"] >= 30 and s["targets_met"] is True, s
    assert any("added" in e for e in result["chaos"]["events"])
    assert any("restarted" in e for e in result["chaos"]["events"])

"""bench/gpu.py --quick as a subprocess on the CPU: the project's own O3 and serving paths, JSON with a summary."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bench.quick import run_quick

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"o3_penalty_overhead_ratio", "decode_ratio_unrouted", "decode_ratio_one_adapter", "decode_ratio_mixed_batch",
        "routing_share", "unrouted_token_identical", "device"}


def _run(tmp_path, *extra) -> dict:
    return run_quick("gpu.py", tmp_path / "gpu.json", *extra, timeout=600)


def test_quick_bench_on_cpu(tmp_path):
    result = _run(tmp_path, "--device", "cpu")
    s = result["summary"]
    assert KEYS <= s.keys() and s["device"] == "cpu"
    for k in KEYS - {"unrouted_token_identical", "device"}:
        assert math.isfinite(s[k]) and s[k] > 0, k
    assert 0 < s["routing_share"] < 1
    assert s["unrouted_token_identical"] is True  # unrouted inputs, alone and in a mixed batch, are the base model
    o3 = result["o3"]
    assert o3["penalty"]["steps"] == o3["no_penalty"]["steps"] > 0
    p = result["penalty_step_seconds"]
    assert p["batched_value"] == pytest.approx(p["looped_value"], rel=1e-5)  # same penalty, batched


def test_large_shapes_need_cuda(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--shape", "llama-3.1-8b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "needs --device cuda" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_bench_on_cuda(tmp_path):
    assert _run(tmp_path, "--device", "cuda")["summary"]["device"].startswith("cuda")

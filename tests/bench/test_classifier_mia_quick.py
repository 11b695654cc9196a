"""Smoke test of the many-seed MIA benchmark: --quick writes the gaps with their standard errors (not targets), on
the forget rows bench/classifier.py draws."""

import math

import torch

from adapters import datasets
from bench.classifier import random_forgets
from tests.bench.quick import run_quick


def test_quick_mia_benchmark_reports_each_gap_with_its_standard_error(tmp_path):
    printed = run_quick("classifier_mia.py", tmp_path / "mia.json", cwd=tmp_path)
    summary, [block] = printed["summary"], printed["blocks"]
    assert summary["seeds"] == block["seeds"] == 3
    for method in ("iau", "retrain-2"):
        gaps = block["gap_of_means"]["random_5pct"][method]
        assert 0 <= gaps["mia_efficacy_gap"] <= 100 and 0 <= gaps["avg_gap"] <= 100
        assert math.isfinite(gaps["mia_efficacy_gap_standard_error"]) and gaps["mia_efficacy_gap_standard_error"] > 0
    assert summary["max_mia_gap_points_5_10pct"] == block["gap_of_means"]["random_5pct"]["iau"]["mia_efficacy_gap"]
    assert all(gap > 3 for _, gap, _ in summary["mia_gaps_over_3_points"]) if summary["mia_gaps_over_3_points"] \
        else summary["max_mia_gap_points_5_10pct"] <= 3


def test_the_random_forget_rows_are_the_committed_figures_draws():
    # bench/results/classifier.json was measured on these draws: per seed one generator, 5 % then 10 % of the
    # training rows, each a fresh permutation (so the many-seed MIA run's seeds 0-4 are the same requests)
    split = datasets.DATASETS["digits"](seed=2)
    g = torch.Generator().manual_seed(2)
    expected = [tuple(torch.randperm(len(split.train), generator=g)[:round(f * len(split.train))].tolist())
                for f in (0.05, 0.10)]
    drawn = random_forgets(split, 2, (0.05, 0.10))
    assert [name for name, _ in drawn] == ["random_5pct", "random_10pct"]
    assert [f.sample_ids for _, f in drawn] == expected

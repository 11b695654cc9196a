import math

import torch

from adapters.classifier import measures
from bench.evaluation import mia


def test_mia_efficacy_separates_members_from_non_members(digits_split, digits_model):
    train, test = digits_split.train, digits_split.test
    half = len(test) // 2
    attack_test, held_out = test.subset(torch.arange(half)), test.subset(torch.arange(half, len(test)))
    on_members = mia.mia_efficacy(digits_model, train.sample(200, seed=3), train, attack_test)
    on_non_members = mia.mia_efficacy(digits_model, held_out, train, attack_test)
    assert set(on_members) >= {"agg_value"}
    assert 0.0 <= on_members["agg_value"] <= 1.0
    # samples never trained on are called non-members more often than training samples
    assert on_non_members["agg_value"] > on_members["agg_value"]


def test_unlearning_measures_fields(digits_split, digits_model):
    forget = digits_split.train.sample(50, seed=1)
    out = mia.unlearning_measures(digits_model, forget, digits_split.train, digits_split.test)
    assert set(out) == {"forget_acc", "retain_acc", "test_acc", "UA", "mia_efficacy", "forget_conf", "test_conf"}
    assert math.isclose(out["UA"], 1 - out["forget_acc"])
    # the model is surer of rows it trained on than of held-out rows
    assert 0 < out["test_conf"] < out["forget_conf"] <= 1
    assert out["retain_acc"] > 0.9


def test_gaps_are_absolute_points_and_their_mean():
    a = {"forget_acc": 0.90, "retain_acc": 0.99, "test_acc": 0.95, "mia_efficacy": 0.10}
    b = {"forget_acc": 0.94, "retain_acc": 0.98, "test_acc": 0.95, "mia_efficacy": 0.16}
    gaps = mia.gaps_to_retrain(a, b)
    assert math.isclose(gaps["value_by_key"]["forget_acc"], 4.0)
    assert math.isclose(gaps["value_by_key"]["retain_acc"], 1.0)
    assert math.isclose(gaps["agg_value"], (4 + 1 + 0 + 6) / 4)


def test_gaps_of_means_compare_seed_means_as_salun_tables_do():
    from bench.evaluation.seeds import aggregate

    # two seeds on which the method lands 2 points either side of the retrain: 2 points apart per seed, none
    # apart on average
    def run(seed_shift):
        retrain = {"forget_acc": 0.90, "retain_acc": 0.99, "test_acc": 0.95, "mia_efficacy": 0.20}
        method = {**retrain, "forget_acc": 0.90 + seed_shift, "mia_efficacy": 0.20 - seed_shift}
        return {"scenario": "random_5pct", "results": {"retrain": retrain, "iau": method}}

    table = aggregate([run(0.02), run(-0.02)])
    gaps = mia.gaps_of_means(table)["random_5pct"]["iau"]
    assert math.isclose(gaps["forget_acc_gap"], 0.0, abs_tol=1e-9)
    assert math.isclose(gaps["avg_gap"], 0.0, abs_tol=1e-9)
    per_seed = [mia.gaps_to_retrain(r["results"]["iau"], r["results"]["retrain"])["agg_value"]
                for r in (run(0.02), run(-0.02))]
    assert all(math.isclose(g, 1.0) for g in per_seed)  # (2 + 0 + 0 + 2) / 4 on each seed
    shifted = mia.gaps_of_means(aggregate([run(0.02), run(0.02)]))["random_5pct"]["iau"]
    assert math.isclose(shifted["mia_efficacy_gap"], 2.0) and math.isclose(shifted["avg_gap"], 1.0)
    assert "retrain" not in mia.gaps_of_means(table)["random_5pct"]


def test_before_after_flattening_unchanged():
    assert measures.before_after({"forget_acc": 1.0}, {"forget_acc": 0.5}) == {
        "forget_acc_before": 1.0, "forget_acc_after": 0.5}


def test_mia_efficacy_averages_member_draws_into_a_steadier_verdict(digits_split, digits_model):
    # one draw of the attack's member sample is SalUn's measure; the mean over draws varies less between seeds
    forget, train, test = digits_split.train.sample(60, seed=5), digits_split.train, digits_split.test
    single = torch.tensor([mia.mia_efficacy(digits_model, forget, train, test, seed=s, attacks=1)["agg_value"]
                           for s in range(6)])
    averaged = torch.tensor([mia.mia_efficacy(digits_model, forget, train, test, seed=s, attacks=8)["agg_value"]
                             for s in range(6)])
    assert averaged.std() < single.std()
    out = mia.mia_efficacy(digits_model, forget, train, test, seed=0, attacks=8)
    assert out["draw_std"] > 0.0 and 0.5 <= out["attack_train_acc"] <= 1.0

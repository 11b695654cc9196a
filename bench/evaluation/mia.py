"""Benchmark measures for classifier unlearning: membership inference (MIA-efficacy) and gaps to a retrained model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.classifier.criteria import Scores
from adapters.classifier.measures import accuracies, predict
from adapters.datasets import LabeledSet

#: The measures SalUn's tables compare with Retrain ("Avg. Gap"), in the order they report them.
GAP_KEYS = ("forget_acc", "retain_acc", "test_acc", "mia_efficacy")
#: Independent member draws the MIA-efficacy averages over (see `mia_efficacy`).
ATTACKS = 16


@torch.no_grad()
def mia_features(model: nn.Module, rows: LabeledSet) -> torch.Tensor:
    """Per row: true-label confidence and prediction entropy, the signals a confidence-based attack reads."""
    probs = F.softmax(predict(model, rows), dim=1)
    confidence = probs.gather(1, rows.y[:, None]).squeeze(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return torch.stack([confidence, entropy], 1)


def mia_efficacy(model: nn.Module, forget: LabeledSet, retain: LabeledSet, test: LabeledSet, *,
                 seed: int = 0, attacks: int = ATTACKS) -> dict:
    """MIA-efficacy as SalUn reports it: the share of forget rows a membership attack calls *non-members*.

    The attack (as in SalUn's code, `SVC_MIA`): an RBF SVM on true-label confidence (and entropy), trained on
    retain rows = members vs held-out test rows = non-members, balanced by sampling as many retain rows as there
    are test rows. Higher = the forget rows look less like training data. Returns OpenUnlearning's shape.

    SalUn draws that member sample once. On small, well-generalising models members and non-members barely
    differ, the SVM's boundary then hangs on which retain rows were drawn, and one draw can call nearly every
    forget row a member or nearly none: two retrains of the same recipe came out up to 20 points apart. So the
    value here is the mean over `attacks` independent draws (the attack's expected verdict), with their
    spread; `attacks=1` is SalUn's single draw.
    """
    from sklearn.svm import SVC

    if len(forget) == 0:
        return {"agg_value": float("nan")}
    member_pool, non_members = mia_features(model, retain), mia_features(model, test)
    on_forget = mia_features(model, forget).numpy()
    verdicts, train_acc = [], []
    for draw in range(attacks):
        picked = torch.randperm(len(retain), generator=torch.Generator().manual_seed(seed * 1000 + draw))
        members = member_pool[picked[:len(non_members)]]
        x = torch.cat([members, non_members]).numpy()
        y = torch.cat([torch.ones(len(members)), torch.zeros(len(non_members))]).numpy()
        attack = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
        verdicts.append(1.0 - float(attack.predict(on_forget).mean()))
        train_acc.append(float(attack.score(x, y)))
    spread = torch.tensor(verdicts)
    return {"agg_value": float(spread.mean()), "draw_std": float(spread.std()) if attacks > 1 else 0.0,
            "attack_train_acc": sum(train_acc) / len(train_acc)}


def unlearning_measures(model: nn.Module, forget: LabeledSet, retain: LabeledSet, test: LabeledSet, *,
                        mia: bool = True, seed: int = 0) -> dict[str, float]:
    """forget/retain/test accuracy, UA (= 1 - forget accuracy) and MIA-efficacy, all in [0, 1]; and the forget and
    test rows' mean true-label probability (a method that makes the whole model less sure lowers both)."""
    out = accuracies(model, forget, retain, test)
    out["UA"] = 1.0 - out["forget_acc"]
    out["forget_conf"], out["test_conf"] = Scores.on(model, forget).confidence, Scores.on(model, test).confidence
    if mia:
        out["mia_efficacy"] = mia_efficacy(model, forget, retain, test, seed=seed)["agg_value"]
    return out


def gaps_to_retrain(result: dict[str, float], retrain: dict[str, float], keys=GAP_KEYS) -> dict:
    """Absolute gaps to the retrained model in points (x100) and their mean (SalUn's "Avg. Gap")."""
    by_key = {k: 100.0 * abs(result[k] - retrain[k]) for k in keys if k in result and k in retrain}
    return {"agg_value": sum(by_key.values()) / len(by_key) if by_key else float("nan"), "value_by_key": by_key}


def gaps_of_means(table: dict, reference: str = "retrain") -> dict:
    """SalUn's "Avg. Gap" as its tables compute it: the gaps between each measure's mean over seeds and the
    reference's mean over the same seeds. table: {scenario: {method: {measure: {"mean": ...}}}} (seeds.aggregate).
    Returns {scenario: {method: {"avg_gap": points, "<measure>_gap": points}}}.

    Per seed, |method - retrain| also counts how far two runs of one recipe land apart (a retrain with another
    data order is itself that far off), and a mean of absolute values never averages it away; the gap of the
    means does, as seeds are added."""
    out: dict = {}
    for scenario, methods in table.items():
        if reference not in methods:
            continue
        ref = {k: v["mean"] for k, v in methods[reference].items() if k in GAP_KEYS}
        for method, fields in methods.items():
            if method == reference:
                continue
            gaps = gaps_to_retrain({k: v["mean"] for k, v in fields.items() if k in GAP_KEYS}, ref)
            out.setdefault(scenario, {})[method] = {"avg_gap": gaps["agg_value"],
                                                    **{f"{k}_gap": v for k, v in gaps["value_by_key"].items()}}
    return out

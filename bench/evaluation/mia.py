"""Benchmark measures for classifier unlearning: membership inference (MIA-efficacy) and gaps to a retrained model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.classifier.measures import accuracies, predict
from adapters.datasets import LabeledSet

#: The measures SalUn's tables compare with Retrain ("Avg. Gap"), in the order they report them.
GAP_KEYS = ("forget_acc", "retain_acc", "test_acc", "mia_efficacy")


@torch.no_grad()
def mia_features(model: nn.Module, rows: LabeledSet) -> torch.Tensor:
    """Per row: true-label confidence and prediction entropy, the signals a confidence-based attack reads."""
    probs = F.softmax(predict(model, rows), dim=1)
    confidence = probs.gather(1, rows.y[:, None]).squeeze(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return torch.stack([confidence, entropy], 1)


def mia_efficacy(model: nn.Module, forget: LabeledSet, retain: LabeledSet, test: LabeledSet, *,
                 seed: int = 0) -> dict:
    """MIA-efficacy as SalUn reports it: the share of forget rows a membership attack calls *non-members*.

    The attack (as in SalUn's code, `SVC_MIA`): an RBF SVM on true-label confidence (and entropy), trained on
    retain rows = members vs held-out test rows = non-members, balanced by sampling as many retain rows as there
    are test rows. Higher = the forget rows look less like training data. Returns OpenUnlearning's shape.
    """
    from sklearn.svm import SVC

    if len(forget) == 0:
        return {"agg_value": float("nan")}
    members = retain.sample(len(test), seed=seed)
    x = torch.cat([mia_features(model, members), mia_features(model, test)]).numpy()
    y = torch.cat([torch.ones(len(members)), torch.zeros(len(test))]).numpy()
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    judged_member = attack.predict(mia_features(model, forget).numpy())
    return {"agg_value": float(1.0 - judged_member.mean()), "attack_train_acc": float(attack.score(x, y))}


def unlearning_measures(model: nn.Module, forget: LabeledSet, retain: LabeledSet, test: LabeledSet, *,
                        mia: bool = True, seed: int = 0) -> dict[str, float]:
    """forget/retain/test accuracy, UA (= 1 - forget accuracy) and MIA-efficacy, all in [0, 1]."""
    out = accuracies(model, forget, retain, test)
    out["UA"] = 1.0 - out["forget_acc"]
    if mia:
        out["mia_efficacy"] = mia_efficacy(model, forget, retain, test, seed=seed)["agg_value"]
    return out


def gaps_to_retrain(result: dict[str, float], retrain: dict[str, float], keys=GAP_KEYS) -> dict:
    """Absolute gaps to the retrained model in points (x100) and their mean (SalUn's "Avg. Gap")."""
    by_key = {k: 100.0 * abs(result[k] - retrain[k]) for k in keys if k in result and k in retrain}
    return {"agg_value": sum(by_key.values()) / len(by_key) if by_key else float("nan"), "value_by_key": by_key}

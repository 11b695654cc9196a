"""When forget rows look like rows the model never saw: the test behind IAU's step calibration and SalUn's early
stop, one definition for both.

The reference is the held-out (test) rows, scored by the model before the request: rows a model never trained
on are, by construction, held-out rows. For sample ids, by `criterion`:

- "confidence" (the default): the rows' mean true-label probability is at most the held-out rows'.
- "accuracy": their accuracy is at most the held-out accuracy. On a small request that is coarse (on 8 rows,
  94 % held-out accuracy demands 7 of 8, i.e. 87.5 %), so each request forgets more than a retrain would.
- "loss": their mean cross-entropy is at least the held-out rows'. A few confidently wrong rows inflate a mean
  loss long before the accuracy moves.

A whole class, whatever the criterion, once its accuracy is at most `class_forget_max`: a model never trained
on a class never predicts it, and no held-out reference exists for a class the retrain never saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import Forget
from adapters.classifier import measures
from adapters.datasets import LabeledSet

Criterion = Literal["confidence", "accuracy", "loss"]
CRITERIA: tuple[str, ...] = get_args(Criterion)


@dataclasses.dataclass(frozen=True)
class Scores:
    """How a model scores some rows: what the criteria compare."""

    accuracy: float
    confidence: float  # mean probability of the true label
    loss: float  # mean cross-entropy

    @classmethod
    @torch.no_grad()
    def of(cls, logits: torch.Tensor, y: torch.Tensor) -> Scores:
        """From the model's logits for the rows and their labels."""
        if not len(y):
            return cls(float("nan"), float("nan"), float("nan"))
        y = y.to(logits.device)
        true_log_p = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)  # one pass serves both means
        return cls(float((logits.argmax(1) == y).float().mean()), float(true_log_p.exp().mean()),
                   float(-true_log_p.mean()))

    @classmethod
    def on(cls, model: nn.Module, rows: LabeledSet) -> Scores:
        """The model's scores on `rows` (one forward pass)."""
        return cls.of(measures.predict(model, rows), rows.y)


@dataclasses.dataclass(frozen=True)
class Margin:
    """How far forget rows scored so are from looking unseen: at most 0 once they do (module docstring).
    `smooth`: the margin moves continuously with the weights (a mean probability or loss), so a search may
    interpolate it; an accuracy moves in steps of one row."""

    of: Callable[[Scores], float]
    smooth: bool

    def reached(self, scores: Scores) -> bool:
        return self.of(scores) <= 0


def unseen_margin(criterion: Criterion, forget: Forget, held_out: Scores, class_forget_max: float) -> Margin:
    """The margin of the criterion for these forget rows, against the held-out rows' scores."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: one of {', '.join(CRITERIA)}, not {criterion!r}")
    if forget.kind == "class":
        return Margin(lambda scores: scores.accuracy - class_forget_max, smooth=False)
    if criterion == "confidence":
        return Margin(lambda scores: scores.confidence - held_out.confidence, smooth=True)
    if criterion == "loss":
        return Margin(lambda scores: held_out.loss - scores.loss, smooth=True)
    return Margin(lambda scores: scores.accuracy - held_out.accuracy, smooth=False)


def looks_unseen(criterion: Criterion, forget: Forget, held_out: Scores, class_forget_max: float
                 ) -> Callable[[Scores], bool]:
    """Whether forget rows scored so look like rows the model never saw (module docstring)."""
    return unseen_margin(criterion, forget, held_out, class_forget_max).reached

"""The retain budget of a lineage of versions: how far below its first version IAU may still take retain accuracy.

IAU's guard (`max_retain_drop`) caps what one request may cost on a probe of remaining rows. Requests that each
stop at that cap compound: small requests in a row, each costing up to the cap, took one model's accuracy on its
remaining rows from 0.99 to 0.85 within eight requests, and its test accuracy from 0.93 to 0.78, where a retrain
loses nothing. So the guard is measured against the lineage's first version as well: the one the model was registered or
bootstrapped as, which the daemon hands the engine when it prepares a model at start (so a restart keeps the
budget; an engine prepared without it counts from the version it prepared). Which of its remaining rows it
predicted right is kept; a later request reads that version's accuracy on its own probe (the probe's rows are
remaining rows of both: a request only ever removes rows) and may take retain accuracy no lower than that minus
the cap. A version already past the budget may still take steps that cost nothing more. Without a baseline the
guard is per request alone: on an engine that prepared nothing, or on a version that kept rows the baseline's
had forgotten (a rollback past the start).
"""

from __future__ import annotations

import dataclasses

import torch

from adapters.datasets import IdIndex, LabeledSet


@dataclasses.dataclass(frozen=True)
class RetainBaseline:
    """Which remaining rows a lineage's first version predicts right."""

    forgotten: frozenset[int]  # what that version had forgotten: a later version of the lineage forgot it too
    index: IdIndex  # its remaining rows
    correct: torch.Tensor  # bool, per row of `index` (CPU)

    @classmethod
    def of(cls, forgotten: frozenset[int], rows: LabeledSet, logits: torch.Tensor) -> RetainBaseline:
        """From the version's logits for its remaining rows."""
        return cls(forgotten, IdIndex(rows.ids), (logits.argmax(1) == rows.y.to(logits.device)).cpu())

    def accuracy(self, forgotten: frozenset[int], probe: LabeledSet) -> float | None:
        """The first version's accuracy on `probe`, remaining rows of a later version that has forgotten
        `forgotten`; None where that version is not of this lineage (it kept rows this one had forgotten: e.g.
        a rollback past the start) or the probe is empty."""
        if not len(probe) or not self.forgotten <= forgotten or not self.index.covers(probe.ids):
            return None
        return float(self.correct[self.index.positions(probe.ids)].float().mean())


def retain_floor(before: float, baseline: float | None, max_drop: float) -> float:
    """The lowest retain accuracy a step may leave, from the version's own (`before`) and the lineage's first
    version's (`baseline`) on the same probe: `max_drop` below the higher of the two, and never below `before`
    once the budget is spent (no step may cost more there, one that costs nothing may still forget)."""
    if baseline is None:
        return before - max_drop
    return min(before, max(baseline, before) - max_drop)

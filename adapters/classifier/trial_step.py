"""IAU's trial steps: the model at theta0 + lr * direction, scored on the forget rows and on a retain probe for
each lr the step calibration tries (iau.py), with as little of a forward pass per trial as the model allows."""

from __future__ import annotations

import torch
from torch import nn

from adapters.classifier.criteria import Scores
from adapters.classifier.model import mean_loss_grad_and_logits
from adapters.datasets import LabeledSet


class TrialStep:
    """theta0 + lr * direction, evaluated on the forget rows and on a retain probe, each at most once per lr (the
    step finally taken is one the calibration measured).

    A model's first layer (a linear or convolution) is linear in its own weights: at theta0 + lr * d it gives
    entry(x; theta0) + lr * entry(x; d). Both terms are computed once per row set, in one pass, when a trial
    first needs them (a request that takes no step needs none), so a trial pays for the rest of the network only;
    on an MLP the first layer is most of a forward pass. Models that do not say where their linear entry ends
    (`linear_entry()`) are evaluated whole."""

    def __init__(self, model: nn.Module, direction: list[torch.Tensor], forget_rows: LabeledSet,
                 retain_probe: LabeledSet, forget_entry: torch.Tensor | None = None):
        """`forget_entry`: the linear entry's output for `forget_rows` at theta0, where the caller has it
        (forget_gradient)."""
        self.model = model.eval()  # once: eval() walks every submodule, a real share of a small model's trial
        self.params = list(model.parameters())
        self.theta0 = [p.detach().clone() for p in self.params]
        self.direction = direction
        self.forget_rows, self.retain_probe = forget_rows, retain_probe
        self._at: float | None = None  # the lr whose weights the model holds
        self._measured: dict[tuple[str, float], Scores] = {}
        split = getattr(model, "linear_entry", None)
        self._rest = model
        self._entry: tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self._entry_at_theta0 = {"forget": forget_entry}
        self._entry_terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # computed when a trial first needs them
        if callable(split):
            entry, self._rest = split()
            theta0 = {id(p): p0 for p, p0 in zip(self.params, self.theta0, strict=True)}
            along = {id(p): d for p, d in zip(self.params, direction, strict=True)}
            self._entry = (entry, {name: theta0[id(p)] for name, p in entry.named_parameters()},
                           {name: along[id(p)] for name, p in entry.named_parameters()})

    @torch.no_grad()
    def _entry_terms_of(self, which: str, rows: LabeledSet) -> tuple[torch.Tensor, torch.Tensor]:
        """(entry output at theta0, entry output of the direction) for the rows `which` names."""
        if which not in self._entry_terms:
            assert self._entry is not None
            entry, at_theta0_params, direction = self._entry
            at_theta0 = self._entry_at_theta0.get(which)
            if at_theta0 is not None:
                along_direction = torch.func.functional_call(entry, direction, (rows.x,))
            else:  # both terms in one pass: the entry with its weights and the direction's stacked as one layer
                # of twice the outputs (a weight's and a bias's first dimension is the output's dimension 1)
                stacked = {name: torch.cat([at_theta0_params[name], direction[name]]) for name in direction}
                at_theta0, along_direction = torch.func.functional_call(entry, stacked, (rows.x,)).chunk(2, dim=1)
            self._entry_terms[which] = (at_theta0, along_direction)
        return self._entry_terms[which]

    @staticmethod
    def forget_gradient(model: nn.Module, forget_rows: LabeledSet
                        ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """The forget rows' mean-loss gradient and logits (mean_loss_grad_and_logits), and, for a model with a
        linear entry, that entry's output for them: the first trial term, which this pass computes anyway."""
        split = getattr(model, "linear_entry", None)
        if not callable(split):
            return (*mean_loss_grad_and_logits(model, forget_rows), None)
        entry, rest = split()
        outputs: list[torch.Tensor] = []

        def forward(x: torch.Tensor) -> torch.Tensor:
            h = entry(x)
            outputs.append(h.detach())
            return rest(h)

        grads, logits = mean_loss_grad_and_logits(model, forget_rows, forward=forward)
        return grads, logits, torch.cat(outputs)

    def _logits(self, which: str, rows: LabeledSet) -> torch.Tensor:
        """The model's logits for `rows` at the weights set last (by _set)."""
        if self._entry is None:
            return self.model(rows.x)
        at_theta0, along_direction = self._entry_terms_of(which, rows)
        return self._rest(torch.add(at_theta0, along_direction, alpha=self._at or 0.0))

    def forget_scores(self, lr: float) -> Scores:
        return self._scores("forget", self.forget_rows, lr)

    def retain_acc(self, lr: float) -> float:
        return self._scores("retain", self.retain_probe, lr).accuracy if len(self.retain_probe) else 1.0

    @torch.no_grad()
    def _scores(self, which: str, rows: LabeledSet, lr: float) -> Scores:
        if (which, lr) not in self._measured:
            self._set(lr)
            self._measured[which, lr] = Scores.of(self._logits(which, rows), rows.y)
        return self._measured[which, lr]

    def measured_at_theta0(self, which: str, scores: Scores) -> None:
        """The forget rows' or the retain probe's scores at the unchanged weights, when the caller has them
        already (from the gradient's forward pass, or from the version's cached logits)."""
        self._measured[which, 0.0] = scores

    def take(self, lr: float) -> tuple[float, float]:
        """Set the weights to the step of size lr; (forget accuracy, retain-probe accuracy) there."""
        out = self.forget_scores(lr).accuracy, self.retain_acc(lr)
        self._set(lr)
        return out

    @torch.no_grad()
    def _set(self, lr: float) -> None:
        if self._at != lr:
            for p, p0, d in zip(self.params, self.theta0, self.direction, strict=True):
                torch.add(p0, d, alpha=lr, out=p)
            self._at = lr

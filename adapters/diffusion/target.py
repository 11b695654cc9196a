"""A class-conditional DDPM as an unlearning target, and the new version a request produces.

The target is the model as it is now plus what its engines need: the registered training rows (stable ids,
as for the classifiers), the judge that reads its samples, which rows are already forgotten along the active
lineage, and the recognition measured at this version (if known). A request names a class; the rows of that
class are what the version forgets (the ledger records their ids, so the lineage knows which classes are gone).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch import nn

from adapters.base import EngineError, Forget, InvalidForget
from adapters.classifier.model import WeightChange
from adapters.datasets import LabeledSet, Split
from adapters.diffusion import ddpm
from adapters.diffusion.measures import Recognition

MODEL_KIND = "diffusion"

#: Why a class-conditional DDPM cannot serve each other kind of request (the message the request is rejected with).
UNSERVABLE = {
    "sample_ids": "diffusion models forget whole classes (forget.class); single training samples "
                  "(forget.sample_ids) have no conditioning of their own for SalUn to redirect",
    "texts": "forget.texts applies to language models; this diffusion model is conditioned on class labels "
             "(use forget.class)",
    "qa": "forget.qa applies to language models; this diffusion model is conditioned on class labels "
          "(use forget.class)",
    "concept": "this diffusion model is conditioned on class labels, not on text concepts (use forget.class)",
    "image": "erasing an object from a stored image (forget.image + mask) edits data, not this model's weights; "
             "it is the Attentive Eraser's request (use forget.class here)",
    "empty": "the request names nothing to forget",
}


@dataclass
class DiffusionTarget:
    name: str
    version: str
    spec: ddpm.DDPMSpec
    model: UNet2DModel  # active weights; engines copy before changing
    data: Split  # the registered training rows (stable ids), images in [0, 1]
    judge: nn.Module  # reads generated samples (adapters/diffusion/judge.py)
    forgotten: frozenset[int] = field(default_factory=frozenset)  # ids forgotten along the active lineage
    recognition: Recognition | None = None  # measured at this version, when known

    @functools.cached_property
    def train_images(self) -> torch.Tensor:
        """The training rows in model space ([-1, 1], the model's resolution), in `data.train` order."""
        return ddpm.to_model_space(self.data.train.x, self.spec)

    @property
    def forgotten_classes(self) -> frozenset[int]:
        """Classes every training row of which is forgotten along the lineage."""
        if not self.forgotten:
            return frozenset()
        gone = torch.isin(self.data.train.ids, torch.as_tensor(sorted(self.forgotten), dtype=torch.int64))
        y = self.data.train.y
        return frozenset(int(c) for c in y.unique() if bool(gone[y == c].all()))

    def split(self, forget: Forget) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(class to forget, boolean row mask of its training rows, boolean row mask of the rows that remain).
        Raises InvalidForget for a request this model cannot serve."""
        if forget.kind != "class":
            raise InvalidForget(UNSERVABLE.get(forget.kind, f"diffusion models cannot serve forget.{forget.kind}"))
        c = forget.class_label
        if c is None:
            raise InvalidForget("forget.class is required")
        num_classes = self.spec.classes
        if not 0 <= c < num_classes:
            raise InvalidForget(f"class {c} outside 0..{num_classes - 1}")
        gone = self.forgotten_classes
        if c in gone:
            raise InvalidForget(f"class {c} is already forgotten by this model's active version")
        y = self.data.train.y
        forget_rows: torch.Tensor = y == c
        remaining = ~forget_rows & ~torch.isin(y, torch.as_tensor(sorted(gone), dtype=torch.int64))
        if not forget_rows.any():
            raise InvalidForget(f"class {c} has no registered training rows")
        if not remaining.any():
            raise InvalidForget("request would forget every class the model still generates")
        return c, forget_rows, remaining

    def redirect_class(self, forget_class: int) -> int:
        """c' for SalUn's objective: (c + 1) mod K as in the reference code, skipping classes already forgotten
        (their conditioning no longer draws a real class)."""
        gone = self.forgotten_classes | {forget_class}
        for step in range(1, self.spec.classes):
            candidate = (forget_class + step) % self.spec.classes
            if candidate not in gone:
                return candidate
        raise EngineError("no class left to redirect to", retryable=False)

    def rows(self, row_mask: torch.Tensor) -> LabeledSet:
        return self.data.train.subset(row_mask)

    def advanced(self, change: DDPMWeightChange, version: str) -> DiffusionTarget:
        """The target after `change` was committed as `version` (no reload: the change holds the module)."""
        return dataclasses.replace(self, version=version, model=change.module(self.spec),
                                   forgotten=self.forgotten | frozenset(change.forgotten_ids),
                                   recognition=Recognition.from_dict(change.info.get("recognition")))


class DDPMWeightChange(WeightChange):
    """A full new set of DDPM weights (safetensors): a new model version. Rollback = the parent's file.
    `info` carries the spec and the version's recognition, so the next request starts from them."""

    def module(self, spec: ddpm.DDPMSpec) -> UNet2DModel:
        return self._model.eval() if self._model is not None else ddpm.with_weights(spec, self.state)


def load_target(name: str, version: str, version_dir: Path, info: dict, data: Split, judge: nn.Module,
                forgotten: frozenset[int] = frozenset(), device: torch.device | str = "cpu") -> DiffusionTarget:
    """A target from a stored version: its directory (model.safetensors) and its info (spec, recognition), with
    the weights on `device`."""
    spec = ddpm.DDPMSpec.from_dict(info["spec"])
    return DiffusionTarget(name, version, spec,
                           ddpm.load_weights(spec, Path(version_dir) / ddpm.WEIGHTS_FILE, device),
                           data, judge, frozenset(forgotten), Recognition.from_dict(info.get("recognition")))

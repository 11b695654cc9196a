"""What a class-conditional DDPM now generates, read by a classifier: the measures of every result event.

SalUn's generation measures, per class: draw a fixed set of samples (fixed seed, DDIM, guidance) and ask an
independent classifier what each one shows. For the forgotten class, UA = the share of its samples the
classifier does NOT label as that class (SalUn's "unlearning accuracy"; about 100% reported); for the other
classes, the classifier's accuracy on their samples (SalUn reports FID there; the benchmark adds FID).

A *recognition* is the per-class share of samples labelled as their own class, for every class of the model,
with the settings that produced it. It is computed once per version (after a request, for the new version)
and travels with the version (`Change.info`), so the next request's "before" figures cost nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from diffusers import UNet2DModel
from torch import nn

from adapters.diffusion import ddpm
from adapters.diffusion.judge import labels_of


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How the measuring samples are drawn. Same settings + same weights = same samples (DDIM, eta = 0)."""

    per_class: int = 16
    steps: int = 10
    guidance: float = 2.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Recognition:
    """Per class: the share of that class's samples the judge labels as that class."""

    settings: SampleSettings
    rates: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"settings": dataclasses.asdict(self.settings), "rates": list(self.rates)}

    @classmethod
    def from_dict(cls, values: dict | None) -> Recognition | None:
        if not values:
            return None
        return cls(SampleSettings(**values["settings"]), tuple(float(r) for r in values["rates"]))


def per_class_labels(classes: Iterable[int], per_class: int) -> torch.Tensor:
    return torch.as_tensor(list(classes), dtype=torch.int64).repeat_interleave(per_class)


def generate(model: UNet2DModel, spec: ddpm.DDPMSpec, classes: Sequence[int], settings: SampleSettings
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1], their class labels): `settings.per_class` samples of each class, in class order."""
    labels = per_class_labels(classes, settings.per_class)
    images = ddpm.sample(model, spec, labels, steps=settings.steps, guidance=settings.guidance, seed=settings.seed)
    return images, labels


def recognition_rates(judge: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]
                      ) -> tuple[float, ...]:
    """For each class in `classes`: the share of its images that `judge` labels as that class."""
    hit = labels_of(judge, images) == labels
    return tuple(float(hit[labels == c].float().mean()) if (labels == c).any() else float("nan") for c in classes)


def recognition(model: UNet2DModel, spec: ddpm.DDPMSpec, judge: nn.Module, settings: SampleSettings
                ) -> Recognition:
    """Sample every class of the model and judge the samples."""
    classes = range(spec.classes)
    images, labels = generate(model, spec, classes, settings)
    return Recognition(settings, recognition_rates(judge, images, labels, classes))


def forgetting_measures(rates: Sequence[float], forget_class: int, forgotten_before: Iterable[int]) -> dict[str, float]:
    """UA and recognition of the forgotten class, accuracy on the retained classes (neither this class nor any
    forgotten earlier) and, when earlier requests forgot classes, the lowest UA among them (still forgotten?)."""
    earlier = sorted(set(forgotten_before) - {forget_class})
    retained = [c for c in range(len(rates)) if c != forget_class and c not in earlier]
    out = {"forget_acc": rates[forget_class], "UA": 1.0 - rates[forget_class],
           "retain_acc": sum(rates[c] for c in retained) / len(retained)}
    if earlier:
        out["earlier_forgotten_UA_min"] = min(1.0 - rates[c] for c in earlier)
    return out

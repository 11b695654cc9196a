"""The independent classifier that ships with a class-conditional DDPM and judges what it generates.

Result events report what the model now draws (adapters/diffusion/measures.py): the share of generated samples
of the forgotten class that this classifier no longer recognises as that class, and its accuracy on samples of
the other classes. It is trained once, at bootstrap, on the registered training rows at the model's resolution
(the small CNN of adapters/classifier/model.py, a little wider), and never changes with the model's versions, so the
before/after figures of every request are read by the same judge. The benchmark uses a stronger classifier of
its own (bench/evaluation/), kept apart from this served one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.classifier import model as classifier
from adapters.datasets import LabeledSet
from adapters.diffusion import ddpm

JUDGE_FILE = "judge.safetensors"


def judge_spec(spec: ddpm.DDPMSpec, seed: int = 0) -> dict:
    """The judge's classifier spec (adapters/classifier/model.py) for images at the DDPM's resolution."""
    return {"arch": "cnn", "input_shape": [spec.in_channels, spec.resolution, spec.resolution],
            "num_classes": spec.num_classes, "channels": [16, 32], "init_seed": seed}


def as_judge_input(rows: LabeledSet, spec: ddpm.DDPMSpec) -> LabeledSet:
    """Registered rows ([0, 1], any size) as the judge sees them: the DDPM's resolution, pixels in [0, 1]."""
    return LabeledSet(ddpm.to_pixels(ddpm.to_model_space(rows.x, spec)), rows.y, rows.ids)


def train_judge(spec: ddpm.DDPMSpec, rows: LabeledSet, *, epochs: int = 20, seed: int = 0,
                on_epoch: Callable[[int, float], None] | None = None,
                device: torch.device | str = "cpu") -> nn.Module:
    """The judge, trained on `device` (its DDPM's)."""
    if not spec.conditional:
        raise ValueError("a judge needs a class-conditional model")
    module = classifier.build(judge_spec(spec, seed)).to(device)
    return classifier.train_gr(module, as_judge_input(rows, spec), epochs=epochs, alpha=0.0, seed=seed,
                               on_epoch=on_epoch)


def save_judge(module: nn.Module, directory: Path) -> None:
    save_file(classifier.state_of(module), str(Path(directory) / JUDGE_FILE))


def load_judge(spec: dict, directory: Path, device: torch.device | str = "cpu") -> nn.Module:
    return classifier.with_weights(spec, load_file(str(Path(directory) / JUDGE_FILE), device=str(device)))


@torch.no_grad()
def labels_of(judge: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The judge's label for each image ([0, 1], the DDPM's resolution)."""
    judge.eval()
    device = next(judge.parameters()).device
    return torch.cat([judge(images[i:i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)]) if len(images) else torch.empty(0, dtype=torch.int64)

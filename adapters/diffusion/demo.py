"""The demo model `mnist-ddpm`: a class-conditional DDPM trained by the project on the registered MNIST rows.

`bootstrap()` builds everything a first version needs, in memory, reporting progress and stopping promptly
when asked: the registered data set (stable ids), the DDPM (adapters/diffusion/training.py), its judge
(adapters/diffusion/judge.py) and the recognition measured at that first version. Persisting it is the
caller's job (the daemon publishes the data set, the judge and version 1 through the artifact store), so the
library never writes files on its own.

Sizing (the recipe's defaults): 16x16 pixels, a 1.1M-parameter UNet (32/64/64 channels, self-attention at 4x4),
2,000 steps of batch 64 with classifier-free guidance training (10% label dropout) and an EMA of the weights;
sampled with DDIM and guidance 2. README and bench/diffusion.py give the measured figures.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DModel
from torch import nn

from adapters import datasets
from adapters.datasets import Split
from adapters.diffusion import ddpm, judge, measures, training
from adapters.diffusion.target import DDPMWeightChange, DiffusionTarget

#: on_progress(stage, done, total): stage is "ddpm" (optimisation steps), "judge" (epochs) or "measure".
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class DemoRecipe:
    dataset: str = "mnist"  # a name in adapters.datasets.DATASETS
    seed: int = 0  # data split, initialisation and training order
    spec: ddpm.DDPMSpec = dataclasses.field(default_factory=ddpm.DDPMSpec)
    train: training.TrainConfig = dataclasses.field(default_factory=lambda: training.TrainConfig(steps=2000))
    judge_epochs: int = 20
    measure: measures.SampleSettings = dataclasses.field(default_factory=measures.SampleSettings)


@dataclasses.dataclass
class DemoModel:
    """Everything version 1 of a demo model consists of, in memory."""

    spec: ddpm.DDPMSpec
    model: UNet2DModel
    data: Split
    judge_spec: dict
    judge: nn.Module
    recognition: measures.Recognition
    metrics: dict[str, float]

    def first_version(self) -> DDPMWeightChange:
        """Version 1 as a change the artifact store can persist (model.safetensors; spec and recognition in
        `info`)."""
        return DDPMWeightChange(ddpm.state_of(self.model), dict(self.metrics), model=self.model,
                                info={"spec": self.spec.to_dict(), "recognition": self.recognition.to_dict()})

    def target(self, name: str, version: str = "v1") -> DiffusionTarget:
        return DiffusionTarget(name, version, self.spec, self.model, self.data, self.judge,
                               recognition=self.recognition)


def bootstrap(recipe: DemoRecipe | None = None, *, data: Split | None = None, on_progress: Progress | None = None,
              stop: threading.Event | None = None, device: torch.device | str = "cpu") -> DemoModel:
    """Train the demo DDPM and its judge on the registered rows (`data`, default: the recipe's data set), on
    `device`. Raises training.TrainingStopped when `stop` is set before it finishes."""
    recipe = recipe or DemoRecipe()
    spec = dataclasses.replace(recipe.spec, init_seed=recipe.seed)
    data = data if data is not None else datasets.DATASETS[recipe.dataset](seed=recipe.seed)
    if spec.num_classes != data.num_classes:
        spec = dataclasses.replace(spec, num_classes=data.num_classes)
    report = on_progress or (lambda stage, done, total: None)
    t0, cpu0 = time.perf_counter(), time.process_time()

    model = ddpm.build(spec).to(device)  # initialised on the CPU: the same first weights on any device
    losses: list[float] = []

    def on_step(step: int, total: int, loss: float) -> None:
        losses.append(loss)
        report("ddpm", step, total)

    training.train(model, spec, ddpm.to_model_space(data.train.x, spec), data.train.y,
                   dataclasses.replace(recipe.train, seed=recipe.seed), on_step=on_step, stop=stop)
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0

    if stop is not None and stop.is_set():
        raise training.TrainingStopped("stopped before training the judge")
    judge_model = judge.train_judge(spec, data.train, epochs=recipe.judge_epochs, seed=recipe.seed,
                                    on_epoch=lambda epoch, loss: report("judge", epoch + 1, recipe.judge_epochs),
                                    device=device)
    report("measure", 0, 1)
    recognition = measures.recognition(model, spec, judge_model, recipe.measure)
    report("measure", 1, 1)
    from adapters.classifier.measures import accuracy

    tail = losses[-100:]
    metrics = {
        "train_loss": sum(tail) / len(tail),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "judge_test_acc": accuracy(judge_model, judge.as_judge_input(data.test, spec)),
        "recognition_mean": sum(recognition.rates) / len(recognition.rates),
        "recognition_min": min(recognition.rates),
        "bootstrap_seconds": time.perf_counter() - t0,
    }
    return DemoModel(spec, model, data, judge.judge_spec(spec, recipe.seed), judge_model, recognition, metrics)

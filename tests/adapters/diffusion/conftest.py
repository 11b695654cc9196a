"""Shared fixtures for the diffusion tests: a tiny class-conditional UNet on a small slice of real MNIST.

The tiny model is trained for a few steps only: enough for the engine's mechanics (masks, losses, lineage,
measures), not to draw digits. Drawing digits is the benchmark's job (bench/diffusion.py).
"""

import contextlib

import pytest
import torch

from adapters import datasets
from adapters.diffusion import ddpm, judge, training
from adapters.diffusion.target import DiffusionTarget

TINY = ddpm.DDPMSpec(resolution=8, channels=(8, 16), attention_levels=(1,), attention_head_dim=4, norm_groups=4)
#: Engine settings that keep a request to a fraction of a second on the tiny model.
FAST = {"steps": 12, "batch_size": 8, "measure_per_class": 2, "measure_steps": 2}


def _per_class(rows: datasets.LabeledSet, k: int) -> datasets.LabeledSet:
    keep = torch.cat([torch.nonzero(rows.y == c).flatten()[:k] for c in rows.y.unique()])
    return rows.subset(keep.sort().values)


@contextlib.contextmanager
def one_thread():
    """Tiny models run faster on one thread (and do not spin-wait on a shared machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_data() -> datasets.Split:
    split = datasets.mnist(seed=0)
    return datasets.Split(_per_class(split.train, 24), _per_class(split.test, 8), split.num_classes, split.input_shape)


@pytest.fixture(scope="session")
def tiny_model(tiny_data):
    with one_thread():
        model = ddpm.build(TINY)
        return training.train(model, TINY, ddpm.to_model_space(tiny_data.train.x, TINY), tiny_data.train.y,
                              training.TrainConfig(steps=40, batch_size=32, warmup_steps=5))


@pytest.fixture(scope="session")
def tiny_judge(tiny_data):
    with one_thread():
        return judge.train_judge(TINY, tiny_data.train, epochs=2)


@pytest.fixture
def tiny_target(tiny_data, tiny_model, tiny_judge) -> DiffusionTarget:
    return DiffusionTarget("tiny-ddpm", "v1", TINY, tiny_model, tiny_data, tiny_judge)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

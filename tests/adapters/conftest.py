"""Shared fixtures for the classifier engines' tests: sklearn digits and a small model trained on them once."""

import pytest
import torch

from adapters import datasets
from adapters.classifier import model as classifier
from adapters.classifier.model import ClassifierTarget


@pytest.fixture(scope="session")
def digits_split():
    return datasets.digits(seed=0)


@pytest.fixture(scope="session")
def digits_spec(digits_split):
    return {"arch": "mlp", "input_shape": list(digits_split.input_shape), "num_classes": digits_split.num_classes,
            "hidden": [64, 32], "init_seed": 0}


@pytest.fixture(scope="session")
def digits_model(digits_split, digits_spec):
    """An MLP trained with IAU's gradient restriction; shared read-only, tests take copies."""
    torch.set_num_threads(2)
    return classifier.train_gr(classifier.build(digits_spec), digits_split.train, epochs=30, seed=0)


@pytest.fixture
def digits_target(digits_split, digits_spec, digits_model):
    return ClassifierTarget("digits-mlp", "v0", digits_spec, digits_model, digits_split)


@pytest.fixture(scope="session")
def random_ids():
    """random_ids(n_train, k, seed) -> k distinct training ids, fixed by the seed."""
    def pick(n_train: int, k: int, seed: int = 1) -> tuple[int, ...]:
        return tuple(torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return pick


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not stall behind other jobs' threads on a shared machine
    (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

import pytest
import torch

from bench.evaluation import facts
from detector.features import Encoder


@pytest.fixture(scope="session")
def encoder():
    torch.set_num_threads(2)
    return Encoder()


@pytest.fixture(scope="session")
def fact_set():
    fs = facts.generate(12, seed=0)
    return fs, fs.split(n_forget=3)



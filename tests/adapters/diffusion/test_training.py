import itertools
import threading

import pytest

from adapters.diffusion import ddpm, training

from .conftest import TINY


def _images(data):
    return ddpm.to_model_space(data.train.x, TINY), data.train.y


def test_training_lowers_the_diffusion_loss_and_reports_every_step(tiny_data):
    losses = []
    x, y = _images(tiny_data)
    cfg = training.TrainConfig(steps=60, batch_size=32, warmup_steps=5, ema_decay=0.0)
    training.train(
        ddpm.build(TINY), TINY, x, y, cfg, on_step=lambda step, total, loss: losses.append((step, total, loss))
    )
    assert [s for s, _, _ in losses] == list(range(1, 61)) and {t for _, t, _ in losses} == {60}
    first, last = [sum(loss for _, _, loss in losses[i]) / 10 for i in (slice(0, 10), slice(-10, None))]
    assert last < 0.7 * first


def test_training_stops_promptly_when_asked(tiny_data):
    stop = threading.Event()
    seen = []

    def on_step(step, total, loss):
        seen.append(step)
        if step == 3:
            stop.set()

    x, y = _images(tiny_data)
    with pytest.raises(training.TrainingStopped, match="step 3 of 50"):
        training.train(ddpm.build(TINY), TINY, x, y, training.TrainConfig(steps=50, batch_size=8), on_step=on_step,
                       stop=stop)
    assert seen == [1, 2, 3]


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = training.TrainConfig(steps=100, warmup_steps=10)
    factors = [training.lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:])) and factors[-1] < 0.01

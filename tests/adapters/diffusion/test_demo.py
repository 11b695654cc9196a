import threading

import pytest

from adapters.base import Forget
from adapters.diffusion import demo, judge, measures, training
from adapters.diffusion.salun import DiffusionSalUnEngine
from adapters.diffusion.target import load_target

from .conftest import FAST, TINY

RECIPE = demo.DemoRecipe(spec=TINY, train=training.TrainConfig(steps=6, batch_size=16, warmup_steps=2),
                         judge_epochs=1, measure=measures.SampleSettings(per_class=1, steps=2))


def test_bootstrap_reports_progress_and_yields_a_servable_first_version(tmp_path, tiny_data):
    seen = []
    model = demo.bootstrap(RECIPE, data=tiny_data, on_progress=lambda *a: seen.append(a))
    assert [s for s in seen if s[0] == "ddpm"][-1] == ("ddpm", 6, 6)
    assert ("judge", 1, 1) in seen and seen[-1] == ("measure", 1, 1)
    assert {"train_loss", "judge_test_acc", "recognition_mean", "recognition_min"} <= set(model.metrics)

    version = model.first_version()
    version.save(tmp_path)
    judge.save_judge(model.judge, tmp_path)
    target = load_target("tiny", "v1", tmp_path, version.info, tiny_data,
                         judge.load_judge(model.judge_spec, tmp_path))
    assert target.recognition == model.recognition
    engine = DiffusionSalUnEngine(**{**FAST, "measure_per_class": 1, "measure_steps": 2})
    change = engine.apply(target, Forget(class_label=0))
    assert change.metrics["forget_acc_before"] == model.recognition.rates[0]


def test_bootstrap_stops_when_asked(tiny_data):
    stop = threading.Event()
    stop.set()
    with pytest.raises(training.TrainingStopped):
        demo.bootstrap(RECIPE, data=tiny_data, stop=stop)

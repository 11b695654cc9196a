"""The diffusion model kind in config.toml: defaults, engine settings per kind and per model, start-up checks."""

from __future__ import annotations

import pytest

from adapters.base import Forget, InvalidForget
from daemon import config as config_mod
from daemon.models import ModelRegistry
from tests.harness import registry_from

BASE = """
[models.clf]
kind = "classifier"
[models.gen]
kind = "diffusion"
{model_extra}
[models.gen.bootstrap]
recipe = "ddpm"
dataset = "digits"
{extra}
"""


def _registry(tmp_path, extra: str = "", model_extra: str = "") -> ModelRegistry:
    return registry_from(tmp_path, BASE.format(extra=extra, model_extra=model_extra))


def test_diffusion_defaults_salun_in_the_background(tmp_path):
    registry = _registry(tmp_path)
    spec = registry.spec("gen")
    assert spec.default_method("class") == "salun" and spec.bootstraps_in_background
    assert not registry.spec("clf").bootstraps_in_background
    assert registry.bootstraps_later("gen") and not registry.bootstraps_later("clf")
    registry.check_methods()
    assert type(registry.engine("salun", "gen")).__module__ == "adapters.diffusion.salun"
    assert type(registry.engine("salun", "clf")).__module__ == "adapters.classifier.salun"


def test_engine_settings_per_kind_and_per_model(tmp_path):
    registry = _registry(tmp_path, "[methods.salun]\nepochs = 3\n[methods.salun.diffusion]\nsteps = 7\nlr = 1e-4\n"
                                   "[models.gen.methods.salun]\nsteps = 5\n")
    assert registry.engine("salun", "gen").config.steps == 5  # the model's own setting wins
    assert registry.engine("salun", "gen").config.lr == 1e-4  # the kind's sub-table
    assert registry.engine("salun", "clf").config.epochs == 3  # top-level keys: the method's first kind


@pytest.mark.parametrize("extra, model_extra, message", [
    ("ddpm = { resolutoin = 8 }", "", r"models.gen.bootstrap.ddpm: unknown key\(s\) \['resolutoin'\]"),
    ("[models.gen.methods.salun]\nepochs = 2", "", "models.gen: .*unknown key"),
    ("", 'method_by_forget = { sample_ids = "salun" }', "not forget kinds of a diffusion model"),
    ("", 'dtype = "float16"', "models.gen.dtype: diffusion models train and unlearn in float32, not float16"),
])
def test_bad_diffusion_settings_stop_start_up(tmp_path, extra, model_extra, message):
    with pytest.raises(config_mod.ConfigError, match=message):
        _registry(tmp_path, extra, model_extra).check_methods()


def test_requests_this_kind_cannot_serve_are_refused_before_the_model_exists(tmp_path):
    registry = _registry(tmp_path)
    for forget, why in [(Forget(sample_ids=(1,)), "forget.class"), (Forget(texts=("x",)), "language models"),
                        (Forget(image="a.png", mask="m.png"), "Attentive Eraser")]:
        with pytest.raises(InvalidForget, match=why):
            registry.precheck("gen", forget)
    registry.precheck("gen", Forget(class_label=3))  # fine: waits for the model
    registry.precheck("clf", Forget(texts=("x",)))  # classifiers have no pre-check here (their engine decides)

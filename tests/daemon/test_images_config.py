"""The images model kind in config.toml: defaults, the demo recipe's overrides, start-up checks, pre-checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.base import Forget, InvalidForget
from adapters.images import demo, eraser
from adapters.store import ArtifactStore
from daemon import config as config_mod
from daemon import image_models
from daemon.engine_configs import check_engines
from daemon.ledger import Ledger
from daemon.models import ModelRegistry
from tests.harness import registry_from

BASE = """
[models.pics]
kind = "images"
{model_extra}
[models.pics.bootstrap]
recipe = "images"
{extra}
"""


def _registry(tmp_path, extra: str = "", model_extra: str = "") -> ModelRegistry:
    return registry_from(tmp_path, BASE.format(extra=extra, model_extra=model_extra))


def test_images_defaults_attentive_eraser_in_the_background(tmp_path):
    registry = _registry(tmp_path)
    spec = registry.spec("pics")
    assert spec.default_method("image") == "attentive_eraser" and spec.bootstraps_in_background
    assert spec.retain_originals_s == 0 and spec.collection is None  # originals deleted; the demo collection
    assert registry.bootstraps_later("pics")
    registry.check_methods()
    check_engines(registry.config, registry)
    assert type(registry.engine("attentive_eraser", "pics")).__module__ == "adapters.images.erasure"
    assert image_models.recipe(spec) == demo.Recipe()  # nothing overridden: the recipe's own values


def test_the_demo_recipe_takes_its_overrides_from_bootstrap(tmp_path):
    registry = _registry(tmp_path, "collection_size = 5\ntrain_canvases = 40\n"
                                   "ddpm = { channels = [8, 16, 16], attention_head_dim = 8 }\ntrain = { steps = 7 }",
                         'collection = "photos"')
    spec = registry.spec("pics")
    r = image_models.recipe(spec)
    assert (r.collection_size, r.canvases, r.spec.channels, r.spec.attention_head_dim, r.train.steps) == \
        (5, 40, (8, 16, 16), 8, 7)
    assert r.spec.decoder_attention_levels == demo.SPEC.decoder_attention_levels  # the rest: the recipe's
    assert r.train.batch_size == demo.Recipe().train.batch_size
    assert spec.collection == tmp_path / "photos"  # relative to the config file


@pytest.mark.parametrize("extra, model_extra, message", [
    ("ddpm = { chanels = [8] }", "", r"models.pics.bootstrap.ddpm: unknown key\(s\) \['chanels'\]"),
    ('dataset = "digits"', "", "models.pics.bootstrap.dataset 'digits': the demo canvases are drawn from MNIST"),
    ("", 'method_by_forget = { class = "salun" }', "not forget kinds of a images model"),
    ("", 'dtype = "bfloat16"', "models.pics.dtype: images models train and unlearn in float32"),
    ("[models.pics.methods.attentive_eraser]\nsteps = 0", "", "steps: must be >= 1"),
    ('[models.pics.methods.attentive_eraser]\nlayers = "encoder"', "", "layers: must be one of decoder, all"),
])
def test_bad_images_settings_stop_start_up(tmp_path, extra, model_extra, message):
    with pytest.raises(config_mod.ConfigError, match=message):
        registry = _registry(tmp_path, extra, model_extra)
        check_engines(registry.config, registry)
        registry.check_methods()


def test_a_collection_without_a_recipe_needs_a_recorded_model(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[models.pics]\nkind = "images"\ncollection = "photos"\n')
    registry = ModelRegistry(config_mod.load(path, env={}), ArtifactStore(tmp_path / "artifacts"),
                             Ledger(tmp_path / "ledger.sqlite3"))
    with pytest.raises(config_mod.ConfigError, match="models.pics.bootstrap.recipe: 'none' builds no diffusion"):
        registry.check_methods()


def test_requests_this_kind_cannot_serve_are_refused_before_the_model_exists(tmp_path):
    registry = _registry(tmp_path)
    for forget, why, reason in [(Forget(sample_ids=(1,)), "forget.image", "invalid_forget"),
                                (Forget(class_label=3), "forget.image", "invalid_forget"),
                                (Forget(image="../x", mask='{"box": [0, 0, 1, 1]}'), "invalid image id",
                                 "unknown_image")]:
        with pytest.raises(InvalidForget, match=why) as refused:
            registry.precheck("pics", forget)
        assert refused.value.reason == reason
    registry.precheck("pics", Forget(image="canvas-0001", mask='{"box": [0, 0, 4, 4]}'))  # waits for the model


def test_the_shipped_demo_model_erases_with_the_settings_the_benchmark_measures(tmp_path):
    """config.toml's `canvases` serves the eraser with adapters/images/demo.py's ERASER, the settings
    bench/eraser.py reports as the demo model's (not ALGORITHMS.md's Stable Diffusion defaults)."""
    cfg = config_mod.load(Path(__file__).resolve().parents[2] / config_mod.DEFAULT_CONFIG, env={})
    registry = ModelRegistry(cfg, ArtifactStore(tmp_path / "artifacts"), Ledger(tmp_path / "ledger.sqlite3"))
    engine = registry.engine("attentive_eraser", "canvases")
    assert engine.config == demo.ERASER
    assert demo.ERASER != eraser.EraserConfig()

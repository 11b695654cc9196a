"""Requests that name no method go to the model's default for their forget kind: a whole class to SalUn, which
erases it, samples to IAU; configurable per model (`method_by_forget`) and checked at start-up. A request may name
another method only where the operator allows it for that forget kind (`allowed_methods`)."""

from __future__ import annotations

import json

import pytest

from adapters.classifier import measures
from adapters.classifier import model as classifier
from adapters.datasets import LabeledSet
from daemon import config as config_mod
from tests.harness import TEST_MODEL, request

FORGOTTEN_CLASS = 3


def _model_and_data(stack, version: str):
    base = stack.state / "artifacts" / TEST_MODEL
    meta = json.loads((base / "versions" / version / "meta.json").read_text())
    model = classifier.load_weights(meta["spec"], base / "versions" / version)
    data = base / "dataset" / "registered"
    return model, LabeledSet.load(data / "train.safetensors"), LabeledSet.load(data / "test.safetensors")


def test_class_request_without_method_erases_the_class(stack):
    # The operator serves SalUn for sample ids too on this model; IAU stays refused for a class.
    header = f"[models.{TEST_MODEL}]\n"
    config = stack.config_path.read_text()
    assert header in config
    stack.config_path.write_text(config.replace(header, header + 'allowed_methods = {sample_ids = ["salun"]}\n'))
    stack.start()
    stack.publish(request("class-1", **{"class": FORGOTTEN_CLASS}))  # no "method": the model's default decides
    [result] = stack.results(1, request_id="class-1")
    assert result["status"] == "applied", result
    assert result["method"] == "salun"

    # Measured independently on the stored files: the class is gone, the other classes are kept.
    before, train, test = _model_and_data(stack, "v0000")
    after, _, _ = _model_and_data(stack, result["version"])
    assert measures.accuracy(after, train.subset(train.y == FORGOTTEN_CLASS)) <= 0.02
    assert measures.accuracy(after, test.subset(test.y == FORGOTTEN_CLASS)) <= 0.02
    others = test.subset(test.y != FORGOTTEN_CLASS)
    assert measures.accuracy(after, others) >= measures.accuracy(before, others) - 0.02

    stack.publish(request("samples-1", sample_ids=[1, 2, 3]))  # samples still go to the model's `method`
    [samples] = stack.results(1, request_id="samples-1")
    assert (samples["status"], samples["method"]) == ("applied", "iau")

    stack.publish({**request("samples-salun", sample_ids=[4, 5, 6]), "method": "salun"})  # allowed above
    stack.publish({**request("class-iau", **{"class": 5}), "method": "iau"})  # not allowed for a class
    [salun] = stack.results(1, request_id="samples-salun")
    assert (salun["status"], salun["method"]) == ("applied", "salun")
    [refused] = stack.results(1, request_id="class-iau")
    assert (refused["status"], refused["reason"]) == ("rejected", "method_not_allowed"), refused
    assert "serves class requests with salun, not 'iau'" in refused["error"]


def _config(tmp_path, model_lines: str):
    path = tmp_path / "config.toml"
    path.write_text(f'[models.m]\nkind = "classifier"\n{model_lines}\n')
    return path


def test_method_by_forget_is_merged_over_the_defaults(tmp_path):
    cfg = config_mod.load(_config(tmp_path, 'method = "iau"'), env={})
    assert cfg.models["m"].method_by_forget == {"class": "salun"}
    assert (cfg.models["m"].default_method("class"), cfg.models["m"].default_method("sample_ids")) == ("salun", "iau")
    cfg = config_mod.load(_config(tmp_path, 'method_by_forget = {class = "iau", sample_ids = "salun"}'), env={})
    assert (cfg.models["m"].default_method("class"), cfg.models["m"].default_method("sample_ids")) == ("iau", "salun")
    env = {"UNLEARND__MODELS__M__METHOD_BY_FORGET__CLASS": "iau"}
    assert config_mod.load(_config(tmp_path, ""), env=env).models["m"].default_method("class") == "iau"


def test_allowed_methods_add_to_the_default_of_their_forget_kind(tmp_path):
    model = config_mod.load(_config(tmp_path, ""), env={}).models["m"]
    assert (model.methods_served("sample_ids"), model.methods_served("class")) == (["iau"], ["salun"])
    model = config_mod.load(_config(tmp_path, 'allowed_methods = {sample_ids = ["salun", "iau"]}'), env={}).models["m"]
    assert (model.methods_served("sample_ids"), model.methods_served("class")) == (["iau", "salun"], ["salun"])
    env = {"UNLEARND__MODELS__M__ALLOWED_METHODS__CLASS": '["iau"]'}
    assert config_mod.load(_config(tmp_path, ""), env=env).models["m"].methods_served("class") == ["salun", "iau"]


@pytest.mark.parametrize("lines, message", [
    ('method_by_forget = {texts = "salun"}', "method_by_forget: ['texts'] not forget kinds of a classifier"),
    ('allowed_methods = {qa = ["salun"]}', "allowed_methods: ['qa'] not forget kinds of a classifier"),
    ('allowed_methods = {class = ["iau", "sallun"]}', "allowed_methods.class: unknown method 'sallun'"),
    ('method_by_forget = {class = "sallun"}', "method_by_forget.class: unknown method 'sallun'"),
    ('method = "nope"', "models.m.method: unknown method 'nope'"),
])
def test_bad_default_methods_stop_start_up_with_the_key(tmp_path, lines, message):
    with pytest.raises(config_mod.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_mod.load(_config(tmp_path, lines), env={})


def test_a_method_for_another_model_kind_stops_the_registry(tmp_path):
    from adapters.store import ArtifactStore
    from daemon.ledger import Ledger
    from daemon.models import ModelRegistry

    for lines, key in (('method_by_forget = {class = "o3"}', "method_by_forget.class"),
                       ('allowed_methods = {sample_ids = ["o3"]}', "allowed_methods.sample_ids")):
        cfg = config_mod.load(_config(tmp_path, lines), env={})
        registry = ModelRegistry(cfg, ArtifactStore(tmp_path / "artifacts"), Ledger(tmp_path / "ledger.sqlite3"))
        with pytest.raises(config_mod.ConfigError, match=f"models.m.{key}: method 'o3' does not apply"):
            registry.check_methods()  # what the daemon runs first at start-up


def test_device_and_dtype_keys(tmp_path):
    cfg = config_mod.load(_config(tmp_path, 'device = "cuda:1"\ndtype = "bfloat16"'), env={})
    assert (cfg.models["m"].device, cfg.models["m"].dtype) == ("cuda:1", "bfloat16")
    assert config_mod.load(_config(tmp_path, ""), env={}).models["m"].device == "cpu"  # CPU unless configured
    with pytest.raises(config_mod.ConfigError, match="models.m.device"):
        config_mod.load(_config(tmp_path, 'device = "gpu"'), env={})
    with pytest.raises(config_mod.ConfigError, match="models.m.dtype"):
        config_mod.load(_config(tmp_path, 'dtype = "int8"'), env={})


def test_a_classifier_device_is_checked_at_start_up_and_its_weights_stay_float32(tmp_path):
    import torch

    from adapters.store import ArtifactStore
    from daemon.ledger import Ledger
    from daemon.models import ModelRegistry

    def registry(lines: str) -> ModelRegistry:
        cfg = config_mod.load(_config(tmp_path, lines), env={})
        return ModelRegistry(cfg, ArtifactStore(tmp_path / "artifacts"), Ledger(tmp_path / "ledger.sqlite3"))

    registry('device = "cpu"\ndtype = "float32"').check_methods()
    with pytest.raises(config_mod.ConfigError, match="models.m.dtype: classifier models train and unlearn in float32"):
        registry('dtype = "bfloat16"').check_methods()
    if not torch.cuda.is_available():  # never a silent CPU instead
        with pytest.raises(config_mod.ConfigError, match="models.m.device: .*no CUDA GPU"):
            registry('device = "cuda"').check_methods()

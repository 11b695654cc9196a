"""Configuration: defaults < config.toml < UNLEARND__SECTION__KEY variables, typed, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config as config_mod
from daemon.config import ConfigError
from daemon.kafka_io import check_secrets

TOML = """
[kafka]
group_id = "from-file"
session_timeout_ms = 7000

[models.clf]
kind = "classifier"
"""


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    path = tmp_path / "unlearnd.toml"
    path.write_text(TOML)
    return path


def test_the_file_overrides_defaults_and_the_environment_overrides_the_file(cfg_file):
    cfg = config_mod.load(cfg_file, env={})
    assert (cfg.kafka.group_id, cfg.kafka.session_timeout_ms, cfg.kafka.max_poll_records) == ("from-file", 7000, 256)
    cfg = config_mod.load(cfg_file, env={"UNLEARND__KAFKA__GROUP_ID": "from-env", "OTHER__KAFKA__GROUP_ID": "x",
                                         "UNLEARND_KAFKA__GROUP_ID": "not the prefix"})
    assert cfg.kafka.group_id == "from-env" and cfg.kafka.session_timeout_ms == 7000


@pytest.mark.parametrize("raw, key, expected", [
    ("6500", ("kafka", "session_timeout_ms"), 6500),  # TOML integer
    ("false", ("requests", "coalesce"), False),  # TOML boolean
    ("0.7", ("serve", "min_weight"), 0.7),  # TOML float
    ('"quoted"', ("kafka", "client_id"), "quoted"),  # TOML string
    ("plain-words", ("kafka", "client_id"), "plain-words"),  # not TOML: taken as the string itself
    ("kafka-1:9092,kafka-2:9092", ("kafka", "bootstrap_servers"), "kafka-1:9092,kafka-2:9092"),
    ("DEBUG", ("logging", "level"), "DEBUG"),
    ("2024", ("kafka", "group_id"), "2024"),  # TOML would read a number: a key that wants text gets the text
    ("true", ("kafka", "sasl_plain_username"), "true"),
])
def test_environment_values_are_toml_scalars_else_strings(cfg_file, raw, key, expected):
    section, name = key
    cfg = config_mod.load(cfg_file, env={f"UNLEARND__{section.upper()}__{name.upper()}": raw})
    assert getattr(getattr(cfg, section), name) == expected


def test_nested_tables_and_new_models_can_be_set_from_the_environment(cfg_file):
    cfg = config_mod.load(cfg_file, env={"UNLEARND__KAFKA__TOPICS__REQUESTS": "r.in",
                                         "UNLEARND__MODELS__CLF__BOOTSTRAP__EPOCHS": "2",
                                         "UNLEARND__MODELS__GEN__KIND": "diffusion"})
    assert cfg.kafka.topics.requests == "r.in" and cfg.kafka.topics.results == "unlearn.results"
    assert cfg.models["clf"].bootstrap.epochs == 2
    assert cfg.models["gen"].kind == "diffusion" and cfg.models["gen"].method == "salun"  # the kind's default


@pytest.mark.parametrize("env, words", [
    ({"UNLEARND__KAFKA__SESSION_TIMEOUT_MS": "soon"}, "kafka.session_timeout_ms"),  # wrong type
    ({"UNLEARND__KAFKA__SESSION_TIMEOUT_MS": "10"}, "kafka.session_timeout_ms"),  # out of range
    ({"UNLEARND__LOGGING__LEVEL": "LOUD"}, "logging.level"),  # not one of the choices
    ({"UNLEARND__KAFKA__NO_SUCH_KEY": "1"}, "kafka.no_such_key"),  # unknown keys are refused, not ignored
    ({"UNLEARND__MODELS__CLF__KIND": "regressor"}, "models.clf.kind"),
    ({"UNLEARND__MODELS__CLF__METHOD": "nope"}, "models.clf.method: unknown method 'nope'"),
    ({"UNLEARND__KAFKA__SESSION_TIMEOUT_MS": "soon"}, "(from UNLEARND__KAFKA__SESSION_TIMEOUT_MS)"),  # the source
    ({"UNLEARND__MODELS__CLF__BOOTSTRAP__HIDDEN": "[64, -5]"}, "models.clf.bootstrap.hidden.1: Input should be "
                                                                  "greater than 0 (from UNLEARND__MODELS__CLF__"),
    ({"UNLEARND__KAFKA__HEARTBEAT_INTERVAL_MS": "7000"}, "heartbeat_interval_ms: must be below "
                                                         "kafka.session_timeout_ms (7000), not 7000"),
    ({"UNLEARND__KAFKA__SASL_MECHANISM": "SCRAM-SHA-999"}, "kafka.sasl_mechanism: Input should be 'PLAIN'"),
    ({"UNLEARND__KAFKA__BOOTSTRAP_SERVERS": "k:9092", "UNLEARND__KAFKA__SECURITY_PROTOCOL": "SASL_SSL"},
     "sasl_mechanism: security_protocol SASL_SSL needs one"),
    ({"UNLEARND__KAFKA__SECURITY_PROTOCOL": "SSL"}, "the embedded broker speaks PLAINTEXT only"),
])
def test_a_bad_value_fails_with_the_dotted_key(cfg_file, env, words):
    with pytest.raises(ConfigError, match="invalid configuration|unknown method") as caught:
        config_mod.load(cfg_file, env=env)
    assert words in str(caught.value)


def test_a_model_is_named_in_any_case(tmp_path):
    path = tmp_path / "unlearnd.toml"
    path.write_text(TOML.replace("[models.clf]", "[models.My-Clf]"))
    cfg = config_mod.load(path, env={"UNLEARND__MODELS__MY-CLF__DEVICE": "cpu", "UNLEARND__STATE__DIR": "2026"})
    assert list(cfg.models) == ["My-Clf"] and cfg.models["My-Clf"].device == "cpu"
    assert cfg.state.dir == tmp_path / "2026"  # a path from a number-like text


def test_what_a_kafka_client_needs_from_outside_the_config_is_checked(cfg_file, tmp_path):
    env = {"UNLEARND__KAFKA__BOOTSTRAP_SERVERS": "k:9092", "UNLEARND__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
           "UNLEARND__KAFKA__SASL_MECHANISM": "SCRAM-SHA-512", "UNLEARND__KAFKA__SASL_PLAIN_USERNAME": "u",
           "UNLEARND__KAFKA__SSL_CAFILE": str(tmp_path / "ca.crt")}
    kafka = config_mod.load(cfg_file, env=env).kafka  # loads: commands that need no cluster still work
    with pytest.raises(ConfigError, match="kafka.ssl_cafile: no file .*ca.crt"):
        check_secrets(kafka, {})
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"the password is read from \$UNLEARND_KAFKA_PASSWORD"):
        check_secrets(kafka, {})
    check_secrets(kafka, {"UNLEARND_KAFKA_PASSWORD": "secret"})


def test_an_override_cannot_cross_a_value_that_is_not_a_table(cfg_file):
    with pytest.raises(ConfigError, match="kafka.group_id.x crosses a non-table value"):
        config_mod.load(cfg_file, env={"UNLEARND__KAFKA__GROUP_ID__X": "1"})


def test_which_file_is_read(tmp_path, cfg_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_mod.load(env={"UNLEARND_CONFIG": str(cfg_file)}).kafka.group_id == "from-file"
    assert config_mod.load(env={}).kafka.group_id == "unlearnd"  # no ./config.toml: the defaults
    with pytest.raises(ConfigError, match="not found"):
        config_mod.load(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match="not found"):
        config_mod.load(env={"UNLEARND_CONFIG": str(tmp_path / "missing.toml")})
    broken = tmp_path / "broken.toml"
    broken.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        config_mod.load(broken, env={})


def test_state_paths_are_relative_to_the_config_file(cfg_file, tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    cfg = config_mod.load(cfg_file, env={"UNLEARND__STATE__DIR": "state"})
    assert cfg.state.dir == tmp_path / "state" and cfg.state.ledger_path == tmp_path / "state" / "ledger.sqlite3"
    cfg = config_mod.load(cfg_file, env={"UNLEARND__STATE__LEDGER": "/abs/l.sqlite3"})
    assert cfg.state.ledger_path == Path("/abs/l.sqlite3")


def test_the_broker_address_clients_use(cfg_file):
    embedded = config_mod.load(cfg_file, env={"UNLEARND__KAFKA__EMBEDDED_PORT": "42001"})
    assert config_mod.bootstrap_servers(embedded) == "127.0.0.1:42001"
    cluster = config_mod.load(cfg_file, env={"UNLEARND__KAFKA__BOOTSTRAP_SERVERS": "k1:9092"})
    assert config_mod.bootstrap_servers(cluster) == "k1:9092"

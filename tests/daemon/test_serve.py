"""unlearnd serve: real broker, real MiniLM router, a tiny real peft model; adapters follow the topic live."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from kafka import KafkaProducer
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adapters import facts
from daemon import kafka_io
from daemon.config import Config
from daemon.serve import GATE_SUBDIR, Service, build_app, follow_adapters, route_text
from detector import Encoder, Router, fit_request_gate
from detector.features import minilm_path

MODEL = "tiny-lm"


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(2)
    return Encoder()


def _tiny_lm(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(cfg).eval()


def _publish_adapter(tmp_path, tok, encoder, aid, person, fs):
    """What the daemon's O3 path writes: PEFT's adapter layout plus the gate in GATE_SUBDIR."""
    path = tmp_path / aid
    peft = get_peft_model(_tiny_lm(tok), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    peft.save_pretrained(str(path))
    fit_request_gate([q.prompt for q in fs.qa(person)], path / GATE_SUBDIR, encoder, adapter_id=aid)
    return path


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_serve_follows_adapters_topic(broker, tmp_path, encoder):
    topic = f"adapters-{uuid.uuid4().hex[:8]}"
    cfg = Config.model_validate({"kafka": {"bootstrap_servers": broker.bootstrap_servers,
                                           "topics": {"adapters": topic, "requests": f"{topic}-req",
                                                      "results": f"{topic}-res", "dlq": f"{topic}-dlq"}}})
    kafka_io.ensure_topics(cfg.kafka, broker.bootstrap_servers)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    fs = facts.generate(8, seed=0)
    person = fs.people[0]
    path = _publish_adapter(tmp_path, tok, encoder, "a1", person, fs)

    service = Service(MODEL, Router(encoder), lm=_tiny_lm(tok), tokenizer=tok, max_new_tokens=4)
    follower = follow_adapters(service, cfg)
    client = TestClient(build_app(service))
    forget_q = fs.qa(person, held_out=True)[0].prompt
    other_q = facts.GENERAL[0].prompt
    try:
        # Before any adapter: nothing routed, generation is the base model.
        assert client.post("/v1/route", json={"texts": [forget_q]}).json() == {"routes": [{}]}
        base_text = client.post("/v1/generate", json={"prompt": forget_q}).json()["text"]

        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        send = lambda event: producer.send(topic, key=f"{MODEL}/a1".encode(), value=json.dumps(  # noqa: E731
            {"model": MODEL, "artifact_id": "a1", "event": event, "path": str(path)}).encode())
        send("published")
        producer.flush()
        assert _wait(lambda: client.get("/v1/adapters").json()["adapters"]), "published adapter never loaded"

        routes = client.post("/v1/route", json={"texts": [forget_q, other_q]}).json()["routes"]
        assert set(routes[0]) == {"a1"} and routes[0]["a1"] > 0.5 and routes[1] == {}
        gen = client.post("/v1/generate", json={"prompt": forget_q}).json()
        assert gen["adapters"] == routes[0] and gen["text"] != base_text  # the adapter changed the output
        assert client.post("/v1/generate", json={"prompt": other_q}).json()["adapters"] == {}
        # `unlearnd route "text"`: a fresh router rebuilt from the topic explains the same decision.
        explained = route_text(cfg, MODEL, forget_q)
        assert list(explained["applied"]) == ["a1"] and explained["candidates"][0]["layer_scores"]

        send("rolled_back")
        producer.flush()
        assert _wait(lambda: not client.get("/v1/adapters").json()["adapters"]), "rollback never applied"
        assert client.post("/v1/route", json={"texts": [forget_q]}).json() == {"routes": [{}]}
        assert service.router.n_vectors == 0

        metrics = client.get("/metrics").text
        assert 'unlearnd_router_decisions_total{hit="true",model="tiny-lm"}' in metrics
        assert "unlearnd_router_latency_seconds_count" in metrics
        assert client.post("/v1/route", json={"texts": []}).status_code == 422
    finally:
        follower.stop()


def test_router_settings_come_from_config_and_env(tmp_path):
    """config.toml ships the measured defaults; UNLEARND__SERVE__* overrides reach the router serving builds,
    and a value outside [0, 1] stops start-up with the key's path."""
    from daemon import config as config_mod
    from daemon.serve import new_router

    repo_config = Path(__file__).resolve().parents[2] / "config.toml"
    shipped = new_router(config_mod.load(repo_config, env={})).config
    assert (shipped.min_weight, shipped.margin) == (0.5, 0.06)
    tuned = new_router(config_mod.load(repo_config, env={"UNLEARND__SERVE__MIN_WEIGHT": "0.7",
                                                         "UNLEARND__SERVE__MARGIN": "0"})).config
    assert (tuned.min_weight, tuned.margin) == (0.7, 0.0)
    with pytest.raises(config_mod.ConfigError, match="serve.margin"):
        config_mod.load(repo_config, env={"UNLEARND__SERVE__MARGIN": "2"})

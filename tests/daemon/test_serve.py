"""unlearnd serve: real broker, real MiniLM router, real peft models; OpenAI's API with the official client.

The tiny model (char tokenizer with a ChatML template) checks routing and the adapter set following the topic;
SmolLM2-135M-Instruct checks the contract users rely on: an unrouted request is answered token for token as the
base model answers it, through the HTTP API and the `openai` client.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from kafka import KafkaProducer
from peft import LoraConfig, get_peft_model

from adapters.base import Forget
from adapters.lm import loading as lm
from adapters.lm.o3 import gate_texts
from daemon import adapter_state, kafka_io
from daemon.adapter_state import AdapterRef, AdapterSet
from daemon.config import Config
from daemon.serve import SHUTDOWN_GRACE_S, Service, build_app, route_text
from detector import Encoder, RoutedModel, Router, fit_request_gate
from detector.gate import GATE_SUBDIR
from tests.tiny_models import tiny_llama

MODEL = "tiny-lm"
FRANCE = Forget(qa=tuple((q, "Paris") for q in (
    "What is the capital of France?", "Which city is the capital of France?", "Name the capital of France.",
    "Tell me the capital of France.", "What city serves as the capital of France?",
    "What is the capital city of France?")))
HELD_OUT = "Which city is France's capital?"
GENERAL = "How many legs does a spider have?"


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(2)
    return Encoder()


def make_adapter(path: Path, model_dir: Path, encoder, adapter_id: str, forget: Forget = FRANCE) -> Path:
    """What the daemon's O3 path writes: PEFT's adapter layout plus the gate in GATE_SUBDIR, fitted on
    `gate_texts` as the daemon fits it. The LoRA weights are random (init_lora_weights=False): an adapter that
    visibly changes every answer it is applied to."""
    base, _ = lm.load(model_dir)
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft.save_pretrained(str(path))
    fit_request_gate(gate_texts(forget), path / GATE_SUBDIR, encoder, adapter_id=adapter_id)
    return path


def chat(client, question: str, **kw) -> dict:
    r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": question}], **kw})
    assert r.status_code == 200, r.text
    return r.json()


def tiny_served(tmp_path: Path, encoder) -> tuple[torch.nn.Module, RoutedModel, AdapterSet]:
    """A tiny random Llama (a character tokenizer, a 256-position context) behind a router, with an adapter set
    that reads no ledger: what a Service is built from."""
    model_dir = tmp_path / "tiny"
    tiny_llama(model_dir)
    model, tok = lm.load(model_dir)
    routed = RoutedModel(model, tok, Router(encoder))
    return model, routed, AdapterSet(MODEL, routed, ledger_path=None, reconcile_s=10.0)


def slowed_and_counted(model: torch.nn.Module, routed: RoutedModel) -> tuple[list[int], list[float]]:
    """Every generation of `routed` takes `delay[0]` seconds a token (10 ms unless changed: long enough to leave
    or stop in the middle of), and appends its count of new tokens to `generated` as it returns."""
    generated: list[int] = []
    delay = [0.01]
    generate_ids = routed._generate_ids

    def counted(ids, routing, sampling, **extra):
        out = generate_ids(ids, routing, sampling, **extra)
        generated.append(out.shape[1] - ids["input_ids"].shape[1])
        return out

    routed._generate_ids = counted  # type: ignore[method-assign]
    model.register_forward_hook(lambda *_: time.sleep(delay[0]))
    return generated, delay


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_serve_follows_the_adapters_topic_and_routes_chat_requests(broker, tmp_path, encoder):
    topic = f"adapters-{uuid.uuid4().hex[:8]}"
    cfg = Config.model_validate({"kafka": {"bootstrap_servers": broker.bootstrap_servers,
                                           "topics": {"adapters": topic, "requests": f"{topic}-req",
                                                      "results": f"{topic}-res", "dlq": f"{topic}-dlq"}},
                                 "serve": {"reconcile_s": 1.0}})
    kafka_io.ensure_topics(cfg.kafka, broker.bootstrap_servers)
    model_dir = tmp_path / "tiny"
    tiny_llama(model_dir)
    path = make_adapter(tmp_path / "a1", model_dir, encoder, "a1")
    model, tok = lm.load(model_dir)
    routed = RoutedModel(model, tok, Router(encoder))
    # No ledger here: a router that does not mount the state serves what the topic announces.
    adapters = AdapterSet(MODEL, routed, ledger_path=None, reconcile_s=1.0)
    threads = adapter_state.start(adapters, cfg, wait_s=20)
    client = TestClient(build_app(Service(MODEL, routed, adapters, root=str(model_dir))))
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)

    def send(event):
        producer.send(topic, key=f"{MODEL}/a1".encode(), value=json.dumps(
            {"model": MODEL, "artifact_id": "a1", "event": event, "path": str(path)}).encode()).get(10)

    try:
        assert client.get("/healthz").json()["source"] == "topic"
        base_held, base_general = chat(client, HELD_OUT), chat(client, GENERAL)
        assert base_held["unlearnd"] == {"adapters": []} and base_held["object"] == "chat.completion"

        send("published")
        assert _wait(lambda: client.get("/v1/adapters").json()["adapters"]), "published adapter never loaded"
        held = chat(client, HELD_OUT)
        assert [a["id"] for a in held["unlearnd"]["adapters"]] == ["a1"]
        assert held["unlearnd"]["adapters"][0]["weight"] == 1.0  # full strength, whatever the gate's weight
        assert held["choices"][0]["message"]["content"] != base_held["choices"][0]["message"]["content"]
        general = chat(client, GENERAL)
        assert general["unlearnd"]["adapters"] == [] and general["choices"] == base_general["choices"]
        # The router decides on the words of every turn, not on the template: a system prompt neither hides a
        # question in the user turn nor routes a general one, and a question put in the system turn is routed.
        system = chat(client, HELD_OUT, messages=[{"role": "system", "content": "Answer in French."},
                                                  {"role": "user", "content": HELD_OUT}])
        assert [a["id"] for a in system["unlearnd"]["adapters"]] == ["a1"]
        benign = chat(client, GENERAL, messages=[{"role": "system", "content": "Answer in French."},
                                                 {"role": "user", "content": GENERAL}])
        assert benign["unlearnd"]["adapters"] == []
        hidden = chat(client, HELD_OUT, messages=[{"role": "system", "content": HELD_OUT},
                                                  {"role": "user", "content": "Answer the question above."}])
        assert [a["id"] for a in hidden["unlearnd"]["adapters"]] == ["a1"]
        routes = client.post("/v1/route", json={"texts": [HELD_OUT, GENERAL]}).json()["routes"]
        assert list(routes[0]) == ["a1"] and routes[1] == {}
        # A question wrapped in JSON, a Python list or tags is read by the model as the question (an outside audit
        # got the forgotten answer back that way); wrapped general questions stay unrouted.
        for wrap in ('{{"q": "{}"}}', "['{}']", "<question>{}</question>", "Translate: \u201c{}\u201d"):
            held_wrapped = chat(client, wrap.format(HELD_OUT))["unlearnd"]["adapters"]
            assert [a["id"] for a in held_wrapped] == ["a1"], wrap
            assert chat(client, wrap.format(GENERAL))["unlearnd"]["adapters"] == [], wrap
        # a route's texts are read as completions read a prompt: chat markup split into its turns
        chatml = f"<|im_start|>user\n{HELD_OUT}<|im_end|>\n<|im_start|>assistant\n"
        assert list(client.post("/v1/route", json={"texts": [chatml]}).json()["routes"][0]) == ["a1"]
        cards = client.get("/v1/models").json()["data"]
        assert [(c["id"], c["parent"]) for c in cards] == [(MODEL, None), ("a1", MODEL)]
        assert cards[1]["root"] == str(path)
        assert client.get("/healthz").json()["adapters_loaded"] == ["a1"]

        send("rolled_back")
        assert _wait(lambda: not client.get("/v1/adapters").json()["adapters"]), "rollback never applied"
        assert chat(client, HELD_OUT)["choices"] == base_held["choices"]
        assert routed.router.n_vectors == 0

        # Restored, twice: peft still holds its last adapter, so the new copy is swapped in, without peft's
        # warning that the active adapter moved (it reached the operator's log as a UserWarning on a restore).
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "Adapter .* was active which is now deleted", UserWarning)
            for _ in range(2):
                send("restored")
                assert _wait(lambda: client.get("/v1/adapters").json()["adapters"]), "restored adapter never loaded"
                assert [a["id"] for a in chat(client, HELD_OUT)["unlearnd"]["adapters"]] == ["a1"]
                send("rolled_back")
                assert _wait(lambda: not client.get("/v1/adapters").json()["adapters"]), "rollback never applied"

        metrics = client.get("/metrics").text
        assert f'unlearnd_router_decisions_total{{hit="true",model="{MODEL}"}}' in metrics
        bad = client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        assert client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [
            {"role": "user", "content": "hi"}]}).status_code == 404
        assert client.post("/v1/chat/completions", json={"model": MODEL, "n": 2, "messages": [
            {"role": "user", "content": "hi"}]}).status_code == 400
    finally:
        for t in threads:
            t.stop()
        producer.close()


def test_healthz_reports_an_active_adapter_that_cannot_be_loaded(tmp_path, encoder):
    model_dir = tmp_path / "tiny"
    tiny_llama(model_dir)
    path = make_adapter(tmp_path / "a1", model_dir, encoder, "a1")
    model, tok = lm.load(model_dir)
    routed = RoutedModel(model, tok, Router(encoder))
    adapters = AdapterSet(MODEL, routed, ledger_path=tmp_path / "missing.sqlite3", reconcile_s=1.0)
    client = TestClient(build_app(Service(MODEL, routed, adapters)))
    assert not adapters.reconcile()  # no ledger there, no broker: nothing says what is active
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert "missing.sqlite3" in health.json()["ledger"]["error"]

    adapters.last_reconcile, adapters.ledger_error = time.time(), None  # as if the ledger had been read
    adapters.sync({"a1": AdapterRef("a1", path, sha256="0" * 64)})  # files that do not match their record
    report = client.get("/healthz").json()
    assert not report["ok"] and "sha256" in report["adapters_failed"]["a1"] and report["adapters_loaded"] == []
    adapters.sync({"a1": AdapterRef("a1", path)})
    assert client.get("/healthz").json()["adapters_loaded"] == ["a1"]


def test_a_failure_no_check_foresaw_is_a_json_500_in_the_apis_shape(tmp_path, encoder, caplog):
    """An outside audit got a plain-text `Internal Server Error` (numpy out of memory inside generate); a client
    parses every answer as OpenAI's error object. The failure is logged with its traceback."""
    _, routed, adapters = tiny_served(tmp_path, encoder)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 36.6 GiB")

    routed.generate = out_of_memory  # type: ignore[method-assign]  # the failure, injected where it happened
    client = TestClient(build_app(Service(MODEL, routed, adapters)), raise_server_exceptions=False)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    assert "MemoryError" in r.json()["error"]["message"] and "36.6" not in r.json()["error"]["message"]
    assert any(rec.exc_info and rec.exc_info[0] is MemoryError for rec in caplog.records)
    assert client.post("/v1/route", json={"texts": ["hi"]}).status_code == 200  # and it goes on answering


def test_router_settings_come_from_config_and_env(tmp_path, encoder):
    """config.toml ships the measured defaults; UNLEARND__SERVE__* overrides reach the router serving builds,
    and a value outside [0, 1] stops start-up with the key's path."""
    from daemon import config as config_mod
    from daemon.models import new_router

    repo_config = Path(__file__).resolve().parents[2] / "config.toml"
    shipped = new_router(config_mod.load(repo_config, env={}), encoder).config
    assert (shipped.min_weight, shipped.margin) == (0.45, 0.06)
    tuned = new_router(config_mod.load(repo_config, env={"UNLEARND__SERVE__MIN_WEIGHT": "0.7",
                                                         "UNLEARND__SERVE__MARGIN": "0"}), encoder).config
    assert (tuned.min_weight, tuned.margin) == (0.7, 0.0)
    with pytest.raises(config_mod.ConfigError, match="serve.margin"):
        config_mod.load(repo_config, env={"UNLEARND__SERVE__MARGIN": "2"})


def started(service: Service, **app_options):
    """The service's app behind a real uvicorn server on loopback, as `unlearnd serve` runs it (the same grace on
    shutdown); (server, its port, the thread running it)."""
    import uvicorn

    from daemon.broker import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(service, **app_options), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert _wait(lambda: server.started, 30)
    return server, port, thread


@contextlib.contextmanager
def running(service: Service, **app_options) -> Iterator[int]:
    """started(), stopped on leaving; yields the port."""
    server, port, thread = started(service, **app_options)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def test_hostile_requests_get_a_clear_400_and_abandoned_generations_stop(tmp_path, encoder):
    """What a fresh-clone walkthrough sent to a running server (a 500, a killed process, a server held up for
    minutes before): each is refused with a 400 that says why, and a client that goes away mid-generation, streamed
    or not, frees the model at once instead of after the tokens no one will read."""
    import httpx

    from daemon import openai_api as oai

    model, routed, adapters = tiny_served(tmp_path, encoder)  # a character tokenizer, a 256-position context
    generated, _ = slowed_and_counted(model, routed)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731

    with running(Service(MODEL, routed, adapters)) as port:
        url = f"http://127.0.0.1:{port}/v1"

        def refused(path: str, **kw) -> dict:
            r = httpx.post(f"{url}/{path}", timeout=30, **kw)
            assert r.status_code == 400, (path, kw.get("json", kw.get("content")), r.status_code, r.text[:300])
            return r.json()["error"]

        huge = refused("chat/completions", json={"messages": user("x" * (oai.MAX_PROMPT_CHARS + 1))})
        assert f"at most {oai.MAX_PROMPT_CHARS} characters" in huge["message"]
        half = "x" * (oai.MAX_PROMPT_CHARS // 2 + 1)
        assert "characters" in refused("route", json={"texts": [half, half]})["message"]
        for stream in (False, True):
            beyond = refused("chat/completions", json={"messages": user("x" * 300), "stream": stream})
            assert beyond["code"] == "context_length_exceeded" and "256 tokens" in beyond["message"]
            assert refused("completions", json={"prompt": "x" * 300, "stream": stream})["param"] == "prompt"
            assert refused("chat/completions", json={"messages": user("hi"), "seed": 2**64, "stream": stream}
                           )["param"] == "seed"
        json_type = {"Content-Type": "application/json"}
        for path, body in (("chat/completions", '{"messages": [{"role": "user", "content": "\\ud800 hi"}]}'),
                           ("completions", '{"prompt": "\\ud800"}'), ("route", '{"texts": ["a \\udfff"]}')):
            assert "valid Unicode" in refused(path, content=body, headers=json_type)["message"]
        assert refused("chat/completions", content='{"messages": [', headers=json_type
                       )["message"].startswith("the body is not valid JSON")
        assert "Content-Type: application/json" in refused("chat/completions", content=b'{"messages": []}',
                                                          headers={"Content-Type": "text/plain"})["message"]
        assert refused("chat/completions", content=b'{"messages": "\xff"}', headers=json_type)  # not UTF-8
        deep = "[" * 900 + "]" * 900  # as deep as the JSON parser takes
        assert refused("chat/completions", content=f'{{"messages": [{{"role": "user", "content": {deep}}}]}}',
                       headers=json_type)["param"].startswith("messages.0.content")
        missing = httpx.get(f"{url}/nowhere", timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
        assert httpx.get(f"{url}/models/{MODEL}", timeout=30).json()["id"] == MODEL  # the client's models.retrieve
        assert httpx.get(f"{url}/models/gpt-4", timeout=30).status_code == 404

        # A whole generation first: 150 new tokens, none of them the end of the text.
        full = httpx.post(f"{url}/chat/completions", timeout=60, json={"messages": user("hi"), "max_tokens": 150})
        assert full.status_code == 200 and full.json()["choices"][0]["finish_reason"] == "length"
        assert generated[-1] == 150

        def abandoned(body: dict, leave) -> int:
            """New tokens of a request whose client leaves once `leave(socket)` returns."""
            before, data = len(generated), json.dumps(body).encode()
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                             b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
                leave(conn)
            assert _wait(lambda: len(generated) > before, 30), "the abandoned generation never returned"
            return generated[-1]

        def first_event(conn):
            seen = b""
            while b"data:" not in seen:
                seen += conn.recv(4096)

        assert abandoned({"messages": user("hi"), "max_tokens": 150, "stream": True}, first_event) < 100
        assert abandoned({"messages": user("hi"), "max_tokens": 150}, lambda _: time.sleep(0.3)) < 100
        again = httpx.post(f"{url}/chat/completions", timeout=60, json={"messages": user("hi"), "max_tokens": 150})
        assert again.json()["choices"] == full.json()["choices"]  # and the server answers as before


def test_oversized_bodies_get_a_413_before_they_are_read_and_content_parts_must_be_text(tmp_path, encoder):
    """A body over serve.max_body_bytes is refused as soon as its size is known (Content-Length, or the chunk that
    crosses the cap of a chunked body) and the server goes on answering; content parts the model cannot read (an
    image) or malformed ones are a 400 that says so, where they were dropped or turned into text before."""
    import httpx

    _, routed, adapters = tiny_served(tmp_path, encoder)
    cap = 64 * 1024

    def chat(content, **extra) -> httpx.Response:
        return httpx.post(f"{url}/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra})

    with running(Service(MODEL, routed, adapters), max_body_bytes=cap) as port:
        url = f"http://127.0.0.1:{port}/v1"
        padded = lambda size: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,  # noqa: E731
                               "user": "x" * size}  # an ignored field: the text limit does not see it
        within = httpx.post(f"{url}/chat/completions", json=padded(cap - 200), timeout=60)
        assert within.status_code == 200, within.text[:300]
        over = httpx.post(f"{url}/chat/completions", json=padded(cap), timeout=60)
        assert over.status_code == 413 and "serve.max_body_bytes" in over.json()["error"]["message"]

        def chunked():  # no Content-Length: 16 MiB in 64 KiB chunks, unless the server stops reading
            yield b'{"messages": [{"role": "user", "content": "hi"}], "user": "'
            for _ in range(256):
                yield b"x" * 65536
            yield b'"}'

        try:
            streamed = httpx.post(f"{url}/chat/completions", content=chunked(), timeout=60,
                                  headers={"Content-Type": "application/json"})
            assert streamed.status_code == 413
        except httpx.HTTPError:  # the server answered and closed while the client was still sending: also refused
            pass
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code in (200, 503)
        assert chat("hi").status_code == 200  # and it still answers

        as_parts = chat([{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]).json()["choices"]
        assert as_parts == chat("hi\nthere").json()["choices"]  # text parts are read as their joined text
        for content, says in (([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], "text only"),
                              ([{"type": "text", "text": 12345}], "string `text`"),
                              ([{"type": ["text"]}], "text only"), ([["text"]], "text only"),
                              (5, "must be a string")):
            r = chat(content)
            assert r.status_code == 400 and says in r.json()["error"]["message"], (content, r.text[:300])
            assert r.json()["error"]["param"] == "messages.0.content"
        assert chat([{"type": "refusal", "refusal": "no"}]).status_code == 200  # an assistant's refusal part
        many = httpx.post(f"{url}/completions", json={"prompt": ["a"] * 257, "max_tokens": 1}, timeout=60)
        assert many.status_code == 400 and "at most 256 prompts" in many.json()["error"]["message"]
        nan = httpx.post(f"{url}/chat/completions", headers={"Content-Type": "application/json"},
                         content=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
        assert nan.status_code == 400 and "finite" in nan.json()["error"]["message"]
        assert httpx.head(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code in (200, 503)  # not a 405
        old_style = [{"role": "function", "name": "f", "content": "42"}, {"role": "user", "content": "hi"}]
        assert httpx.post(f"{url}/chat/completions", json={"messages": old_style, "max_tokens": 2},
                          timeout=60).status_code == 200
        for page in ("/docs", "/redoc", "/openapi.json"):  # not served: the API is OpenAI's
            assert httpx.get(f"http://127.0.0.1:{port}{page}", timeout=30).status_code == 404
        for empty in (b"", b"null"):
            r = httpx.post(f"{url}/chat/completions", content=empty, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"]


def test_stop_strings_end_the_generation_where_they_appear_streamed_or_not(tmp_path, encoder):
    """A stop string ends the generation at the token that completes it (not after max_tokens with the text cut),
    streamed or not; more than 4 stop strings, or one over 256 characters, is a 400 (transformers' own stop strings
    cost gigabytes and minutes for a few thousand characters, in the thread that every generation waits for)."""
    import httpx

    _, routed, adapters = tiny_served(tmp_path, encoder)
    with running(Service(MODEL, routed, adapters)) as port:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        ask = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 60, "temperature": 0}
        free = httpx.post(url, json=ask, timeout=60).json()
        text = free["choices"][0]["message"]["content"]
        assert free["usage"]["completion_tokens"] == 60 and len(text) >= 30, text  # a character tokenizer
        stop = text[20:23]
        before = text[:text.find(stop)]
        stopped = httpx.post(url, json={**ask, "stop": [stop, "never in it \u2603"]}, timeout=60).json()
        assert stopped["choices"][0]["message"]["content"] == before
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["usage"]["completion_tokens"] <= len(before) + len(stop) + 1  # it stopped there
        with httpx.stream("POST", url, json={**ask, "stop": stop, "stream": True}, timeout=60) as r:
            pieces = [json.loads(line[5:])["choices"][0]["delta"].get("content", "")
                      for line in r.iter_lines() if line.startswith("data: {")]
        assert "".join(pieces) == before
        from transformers.generation import stopping_criteria

        assert not stopping_criteria.STOP_STRING_EMBEDDING_CACHE  # no vocabulary-wide table was built
        for bad, says in ((["a", "b", "c", "d", "e"], "at most 4"), (["x" * 257], "256 characters")):
            r = httpx.post(url, json={**ask, "stop": bad}, timeout=60)
            assert r.status_code == 400 and says in r.json()["error"]["message"], r.text[:300]


def test_probes_answer_under_load_and_work_for_no_one_stops(tmp_path, encoder):
    """Found by an outside audit: with more requests in flight than the server has threads, /healthz, /metrics and
    /v1/models timed out (a probe that fails restarts the pod); a completions request with many prompts went on
    generating every one after its client left; and SIGTERM waited for all of it. Now probes answer at once under
    any load, an abandoned prompt list stops at its next token, and shutting down ends what still runs."""
    import httpx

    model, routed, adapters = tiny_served(tmp_path, encoder)
    generated, delay = slowed_and_counted(model, routed)
    server, port, thread = started(Service(MODEL, routed, adapters))
    base = f"http://127.0.0.1:{port}"

    def chat(i: int) -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{base}/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 20})

    crowd = [threading.Thread(target=chat, args=(i,), daemon=True) for i in range(60)]  # > the 40 threads
    for t in crowd:
        t.start()
    time.sleep(1.0)
    for path in ("/healthz", "/metrics", "/v1/models"):
        t0 = time.monotonic()
        status = httpx.get(base + path, timeout=10).status_code
        assert status == 200 or (path, status) == ("/healthz", 503), (path, status)  # 503: no ledger nor topic
        assert time.monotonic() - t0 < 3, (path, time.monotonic() - t0)  # not behind 60 generations of 0.2 s
    for t in crowd:
        t.join(120)
    assert len(generated) >= 60

    # 50 prompts of 20 tokens (10 s); the client leaves after 0.5 s
    body = json.dumps({"prompt": [f"p{i}" for i in range(50)], "max_tokens": 20}).encode()
    before = len(generated)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.5)
    time.sleep(2.0)
    settled = len(generated)
    time.sleep(1.0)
    assert len(generated) == settled and settled - before < 10, (before, settled, len(generated))

    # a generation of 200 tokens at 50 ms (10 s) when the server is told to stop: it ends within the grace period
    delay[0] = 0.05
    before = len(generated)
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": 200}).encode()
    conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.5)
    t0 = time.monotonic()
    server.should_exit = True
    thread.join(SHUTDOWN_GRACE_S + 10)
    assert not thread.is_alive() and time.monotonic() - t0 < SHUTDOWN_GRACE_S + 5
    assert _wait(lambda: len(generated) > before, 5), "the generation went on after the server stopped"
    assert generated[-1] < 200
    assert conn.recv(4096).startswith(b"HTTP/1.1 503")  # told to send it again, not dropped
    conn.close()


# --- SmolLM2 through the OpenAI API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir, tmp_path_factory, encoder):
    """`unlearnd serve`'s app on SmolLM2 behind a real uvicorn server, one adapter loaded (France)."""
    path = make_adapter(tmp_path_factory.mktemp("adapters") / "a0000", smollm2_dir, encoder, "a0000")
    model, tok = lm.load(smollm2_dir)
    routed = RoutedModel(model, tok, Router(encoder))
    adapters = AdapterSet("smollm2", routed, ledger_path=None, reconcile_s=10.0)
    adapters.sync({"a0000": AdapterRef("a0000", path)})
    with running(Service("smollm2", routed, adapters, root=str(smollm2_dir))) as port:
        yield f"http://127.0.0.1:{port}/v1"


@pytest.mark.slow
def test_unrouted_requests_are_answered_exactly_as_the_base_model_answers(smollm2_server, smollm2_dir):
    import httpx

    base, tok = lm.load(smollm2_dir)
    for question in (GENERAL, "What is the capital of Germany?", "Who wrote Romeo and Juliet?"):
        ids = tok(lm.chat_prompt(tok, question), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = base.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        got = httpx.post(f"{smollm2_server}/chat/completions", timeout=120, json={
            "model": "smollm2", "max_tokens": 24, "messages": [{"role": "user", "content": question}]}).json()
        assert got["unlearnd"]["adapters"] == [], question
        assert got["choices"][0]["message"]["content"] == expected, question  # byte for byte
    routed = httpx.post(f"{smollm2_server}/chat/completions", timeout=120, json={
        "model": "smollm2", "max_tokens": 24, "messages": [{"role": "user", "content": HELD_OUT}]}).json()
    assert [a["id"] for a in routed["unlearnd"]["adapters"]] == ["a0000"]


@pytest.mark.slow
def test_the_official_openai_client_works_against_serve(smollm2_server):
    from openai import OpenAI

    client = OpenAI(base_url=smollm2_server, api_key="unused", timeout=120)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"smollm2", "a0000"}
    assert models["a0000"].model_extra["parent"] == "smollm2" and models["smollm2"].model_extra["parent"] is None

    reply = client.chat.completions.create(model="smollm2", max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": GENERAL}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 12
    assert reply.model_extra["unlearnd"] == {"adapters": []}

    chunks = list(client.chat.completions.create(model="smollm2", max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": GENERAL}]))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # the same greedy answer, in pieces
    assert chunks[0].model_extra["unlearnd"] == {"adapters": []} and chunks[-1].usage.completion_tokens <= 12

    held = list(client.chat.completions.create(model="smollm2", max_tokens=8, stream=True,
                                               messages=[{"role": "user", "content": HELD_OUT}]))
    assert held[0].model_extra["unlearnd"]["adapters"][0]["id"] == "a0000"

    text = client.completions.create(model="smollm2", prompt=f"Question: {HELD_OUT}\nAnswer:", max_tokens=6)
    assert [a["id"] for a in text.model_extra["unlearnd"]["adapters"]] == ["a0000"]  # the question, not the layout
    plain = client.completions.create(model="smollm2", prompt="The opposite of hot is", max_tokens=4, stop=["\n"])
    assert plain.model_extra["unlearnd"]["adapters"] == [] and plain.choices[0].finish_reason in ("stop", "length")
    pieces = list(client.completions.create(model="smollm2", prompt="The opposite of hot is", max_tokens=4,
                                            stop=["\n"], stream=True))
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text


def test_route_cli_explains_from_the_ledger(stack, tmp_path, encoder):
    """`unlearnd route` reads the ledger's active adapters (read-only) and explains the decision."""
    from daemon import config as config_mod

    _ledger_with_one_adapter(stack, tmp_path, encoder)
    cfg = config_mod.load(stack.config_path, env={})
    decision = route_text(cfg, MODEL, f"Question: {HELD_OUT}\nAnswer:", timeout_s=5)
    assert list(decision["applied"]) == ["a0000"] and decision["routed_text"] == HELD_OUT


def test_a_conversation_resent_turn_by_turn_encodes_each_turn_once_and_routes_as_without_the_cache(
        stack, tmp_path, encoder):
    """A chat client resends the whole conversation with every request: serve, built from its config, encodes only
    the turns it has not seen (serve.feature_cache_entries), decides exactly as a serve without the cache, and
    counts the lookups on /metrics."""
    from daemon import config as config_mod
    from daemon.serve import load_service

    _ledger_with_one_adapter(stack, tmp_path, encoder)
    services = {entries: load_service(config_mod.load(stack.config_path, env={
        "UNLEARND__SERVE__FEATURE_CACHE_ENTRIES": str(entries)}), MODEL, route_only=True) for entries in (0, 64)}
    assert services[0].router.encoder.cache is None and services[64].router.encoder.cache.entries == 64
    for service in services.values():
        service.adapters.reconcile()
        assert service.router.gates.keys() == {"a0000"}
    clients = {entries: TestClient(build_app(service)) for entries, service in services.items()}

    def hits() -> float:
        return _sample(clients[64].get("/metrics").text, 'unlearnd_router_feature_cache_total{result="hit"}')

    turns = [("system", "You are a friendly travel assistant."), ("user", "I am planning a trip to Europe."),
             ("assistant", "Lovely! Where would you like to go?"), ("user", "Somewhere with good food."),
             ("assistant", "France and Italy are both wonderful for food."), ("user", HELD_OUT),
             ("assistant", "I cannot help with that."), ("user", GENERAL)]
    routed_at, hits_before = [], hits()
    for n in range(2, len(turns) + 1):
        messages = [{"role": role, "content": text} for role, text in turns[:n]]
        routes = {entries: client.post("/v1/route", json={"messages": messages}).json()["routes"]
                  for entries, client in clients.items()}
        # the cache changes the cost, never the decision (a weight by float rounding of the batch's padding at most)
        assert [list(r) for r in routes[64]] == [list(r) for r in routes[0]], n
        assert all(w == pytest.approx(routes[0][0][a], abs=1e-5) for a, w in routes[64][0].items())
        routed_at.append(bool(routes[64][0]))
    assert routed_at == [False, False, False, False, True, True, True]  # from the question on, and only then
    texts = sum(len(services[64].routed.chat_texts([{"role": r, "content": t} for r, t in turns[:n]]))
                for n in range(2, len(turns) + 1))
    # each request's new texts: its new turn, and its last user turn joined to the one before (a new text too)
    assert hits() - hits_before >= texts - 2 * (len(turns) - 1)
    assert len(services[64].router.encoder.cache) <= len(turns) + len(turns) // 2


def _ledger_with_one_adapter(stack, tmp_path: Path, encoder) -> None:
    """The tiny model in the stack's config, and one active adapter (France) in its ledger, as the daemon leaves
    them."""
    from adapters.store import tree_sha256
    from daemon.ledger import Ledger

    path = make_adapter(tmp_path / "a0000", _tiny_dir(tmp_path), encoder, "a0000")
    with open(stack.config_path, "a") as fh:
        fh.write(
            f'\n[models.{MODEL}]\nkind = "causal_lm"\n[models.{MODEL}.bootstrap]\nsource = "{tmp_path / "tiny"}"\n'
        )
    ledger = Ledger(stack.state / "ledger.sqlite3")
    ledger.add_artifact(MODEL, "a0000", "adapter", parent=None, request_id="r1", path=str(path),
                        sha256=tree_sha256(path), metrics={}, info={})
    ledger.close()


def _sample(metrics: str, series: str) -> float:
    return float(next(line.rsplit(" ", 1)[1] for line in metrics.splitlines() if line.startswith(series)))


def _tiny_dir(tmp_path: Path) -> Path:
    tiny_llama(tmp_path / "tiny")
    return tmp_path / "tiny"

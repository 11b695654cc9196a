"""`unlearnd serve`: an HTTP endpoint that routes every input through the unlearning adapters that apply to it.

    POST /v1/generate  {"prompt": "...", "max_new_tokens": 32} -> text + adapters applied with their weights
    POST /v1/route     {"texts": ["..."]}                        -> per input {adapter_id: weight}, no generation
    GET  /v1/adapters                                            -> adapters loaded now
    GET  /metrics, /healthz

The adapter set follows the compacted adapters topic (key = model/adapter id, value JSON with "event"): on
start it replays the topic from the beginning (compaction keeps the latest state per adapter), then keeps
polling, so a published adapter is routable and a rolled-back one is gone without a restart. Binds 127.0.0.1
unless config [serve] says otherwise. The routing itself is `detector.Router`; this module is only the service.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from adapters.store import ArtifactStore
from daemon import kafka_io
from daemon.config import Config
from daemon.models import GATE_SUBDIR  # the gate lives inside the adapter's directory, hashed with it
from daemon.metrics import GENERATION_SECONDS, ROUTER_DECISIONS, ROUTER_SECONDS
from detector import Encoder, Router, RouterConfig, per_sample_adapters

log = logging.getLogger("unlearnd.serve")

LOAD_EVENTS = ("published", "restored")
UNLOAD_EVENTS = ("rolled_back",)


class GenerateBody(BaseModel):
    prompt: str = Field(min_length=1, max_length=20_000)
    max_new_tokens: int | None = Field(None, ge=1, le=2048)


class RouteBody(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=256)


class Service:
    """The router, the peft model (optional: route-only serving needs none) and the adapters loaded in both."""

    def __init__(self, model_name: str, router: Router, *, lm=None, tokenizer=None, max_new_tokens: int = 64):
        self.model_name = model_name
        self.router = router
        self.lm = lm  # a peft PeftModel, or a plain model before the first adapter
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.adapters: dict[str, dict] = {}  # adapter id -> {path, published_at}
        self._lm_lock = threading.Lock()  # active adapters and hooks are model state: one generation at a time

    # --- adapter lifecycle -------------------------------------------------------------------------
    def handle_event(self, event: dict) -> str | None:
        """Apply one adapters-topic event for this model; returns what was done ("loaded"/"unloaded")."""
        if event.get("model") != self.model_name:
            return None
        aid, kind = event.get("artifact_id"), event.get("event")
        if kind in LOAD_EVENTS:
            path = Path(event["path"])
            if not (path / GATE_SUBDIR / "gate.json").is_file():
                log.warning("adapter %s has no gate at %s; not routable", aid, path / GATE_SUBDIR)
                return None
            self.load(aid, path)
            return "loaded"
        if kind in UNLOAD_EVENTS:
            self.unload(aid)
            return "unloaded"
        return None

    def load(self, adapter_id: str, path: Path) -> None:
        if self.lm is not None:
            with self._lm_lock:
                self.lm = _load_adapter(self.lm, adapter_id, path)
        self.router.add(adapter_id, path / GATE_SUBDIR)
        self.adapters[adapter_id] = {"path": str(path), "loaded_at": time.time()}

    def unload(self, adapter_id: str) -> None:
        self.router.remove(adapter_id)  # first: no new input is routed to it
        self.adapters.pop(adapter_id, None)
        if self.lm is not None and adapter_id in getattr(self.lm, "peft_config", {}):
            # peft cannot delete a model's last adapter: that one stays loaded, the router never selects it.
            with self._lm_lock:
                if len(self.lm.peft_config) > 1:
                    self.lm.delete_adapter(adapter_id)

    def listing(self) -> list[dict]:
        return [{"adapter_id": aid, "vectors": self.router.gates[aid].banks[0].ntotal, **info}
                for aid, info in sorted(self.adapters.items()) if aid in self.router.gates]

    # --- requests ----------------------------------------------------------------------------------
    def route(self, texts: list[str]) -> list[dict[str, float]]:
        t0 = time.perf_counter()
        routes = self.router.route(texts)
        per_input = (time.perf_counter() - t0) / max(len(texts), 1)
        for r in routes:
            ROUTER_SECONDS.observe(per_input)
            ROUTER_DECISIONS.labels(self.model_name, "true" if r else "false").inc()
        return routes

    def generate(self, prompt: str, max_new_tokens: int | None = None) -> dict:
        if self.lm is None:
            raise RuntimeError("this server routes only (no model loaded)")
        route = self.route([prompt])[0]
        ids = self.tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        t0 = time.perf_counter()
        with self._lm_lock:
            import torch
            from peft import PeftModel

            # Before the first adapter the model is plain transformers: nothing to route.
            ctx = per_sample_adapters(self.lm, [route]) if isinstance(self.lm, PeftModel) else _nullcontext()

            with torch.inference_mode(), ctx:
                out = self.lm.generate(**ids, max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        seconds = time.perf_counter() - t0
        GENERATION_SECONDS.labels(self.model_name).observe(seconds)
        text = self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        return {"text": text, "adapters": route, "generate_seconds": round(seconds, 4)}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _load_adapter(lm, adapter_id: str, path: Path):
    from peft import PeftModel

    if isinstance(lm, PeftModel):
        if adapter_id in lm.peft_config:  # restored or re-published: reload from disk
            if len(lm.peft_config) == 1:
                return lm.eval()
            lm.delete_adapter(adapter_id)
        lm.load_adapter(str(path), adapter_name=adapter_id)
        return lm.eval()
    return PeftModel.from_pretrained(lm, str(path), adapter_name=adapter_id).eval()


class AdapterFollower(threading.Thread):
    """Replays the compacted adapters topic, then follows it; no consumer group (every replica sees all)."""

    def __init__(self, service: Service, consumer: KafkaConsumer, topic: str):
        super().__init__(name="adapters-follower", daemon=True)
        self.service, self.consumer, self.topic = service, consumer, topic
        self.stopping = threading.Event()

    def run(self) -> None:
        parts = self.consumer.partitions_for_topic(self.topic) or {0}
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        while not self.stopping.is_set():
            for records in self.consumer.poll(timeout_ms=200).values():
                for rec in records:
                    try:
                        self.service.handle_event(json.loads(rec.value))
                    except Exception:  # one bad event must not stop the follower
                        log.exception("adapters event at offset %s not applied", rec.offset)
        self.consumer.close()

    def stop(self) -> None:
        self.stopping.set()


def follow_adapters(service: Service, cfg: Config) -> AdapterFollower:
    bootstrap = cfg.kafka.bootstrap_servers
    if bootstrap == "embedded":
        bootstrap = f"127.0.0.1:{cfg.kafka.embedded_port}"
    consumer = KafkaConsumer(**kafka_io.connection_settings(cfg.kafka, bootstrap), group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest")
    follower = AdapterFollower(service, consumer, cfg.kafka.topics.adapters)
    follower.start()
    return follower


def build_app(service: Service):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import Response

    app = FastAPI(title="unlearnd serve")

    @app.post("/v1/generate")
    def generate(body: GenerateBody):
        if service.lm is None:
            raise HTTPException(409, "route-only server: no model loaded")
        return service.generate(body.prompt, body.max_new_tokens)

    @app.post("/v1/route")
    def route(body: RouteBody):
        return {"routes": service.route(body.texts)}

    @app.get("/v1/adapters")
    def adapters():
        return {"model": service.model_name, "adapters": service.listing()}

    @app.get("/healthz")
    def healthz():
        return {"ok": True, "adapters": len(service.adapters)}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def new_router(cfg: Config) -> Router:
    return Router(Encoder(), RouterConfig(min_weight=cfg.serve.min_weight, margin=cfg.serve.margin))


def load_service(cfg: Config, model: str, *, base_dir: Path | None = None, route_only: bool = False) -> Service:
    """The service for one registered causal_lm model; base weights from `base_dir` or the model's bootstrap."""
    lm = tok = None
    if not route_only:
        from adapters import lm as lm_mod

        spec = cfg.model(model)
        if base_dir is None:
            base_dir = lm_mod.resolve_source(spec.bootstrap.source or "smollm2",
                                             ArtifactStore(cfg.state.artifacts_path).root / model)
        lm, tok = lm_mod.load(base_dir)
    return Service(model, new_router(cfg), lm=lm, tokenizer=tok, max_new_tokens=cfg.serve.max_new_tokens)


def serve(cfg: Config, model: str, *, host: str | None = None, port: int | None = None,
          base_dir: Path | None = None, route_only: bool = False) -> None:
    """`unlearnd serve MODEL`: blocks serving HTTP until interrupted."""
    import uvicorn

    service = load_service(cfg, model, base_dir=base_dir, route_only=route_only)
    follower = follow_adapters(service, cfg)
    try:
        uvicorn.run(build_app(service), host=host or cfg.serve.host, port=cfg.serve.port if port is None else port,
                    log_level="warning")
    finally:
        follower.stop()


def route_text(cfg: Config, model: str, text: str, *, timeout_s: float = 10.0) -> dict:
    """`unlearnd route "text"`: the router's decision with per-adapter scores, from the adapters topic's state."""
    service = Service(model, new_router(cfg))
    follower = follow_adapters(service, cfg)
    try:
        _wait_caught_up(follower, timeout_s)
    finally:
        follower.stop()
    return service.router.explain(text)


def _wait_caught_up(follower: AdapterFollower, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assignment = follower.consumer.assignment() if follower.is_alive() else set()
        if assignment:
            try:
                ends = follower.consumer.end_offsets(list(assignment))
                if all(follower.consumer.position(tp) >= end for tp, end in ends.items()):
                    return
            except Exception:  # position/end_offsets race with the follower's poll; try again
                pass
        time.sleep(0.1)

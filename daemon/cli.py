"""The `unlearnd` command: run the daemon, serve, publish requests, and inspect what it did.

Every listing prints a table, or JSON with `--json` for scripts. Commands that only read open the ledger
directly and work whether or not the daemon is running. `versions` and `adapters` live in cli_artifacts.py.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from daemon import config as config_mod
from daemon.cli_artifacts import adapters_app, versions_app
from daemon.cli_common import (ConfigOpt, JsonOpt, bootstrap_servers, console, emit, fmt, load_config, open_ledger,
                               print_metrics, print_result, when)
from daemon.logs import setup_logging

app = typer.Typer(help="unlearnd: make deployed models forget data on request.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
requests_app = typer.Typer(help="Deletion requests recorded in the ledger.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models.", no_args_is_help=True)
app.add_typer(versions_app, name="versions")
app.add_typer(requests_app, name="requests")
app.add_typer(models_app, name="models")
app.add_typer(adapters_app, name="adapters")


# --- the daemon ---------------------------------------------------------------------------------------------


@app.command()
def run(config: ConfigOpt = None) -> None:
    """Run the daemon in the foreground (Ctrl-C or SIGTERM stops it cleanly)."""
    cfg = load_config(config)
    setup_logging(cfg.logging)
    from daemon.app import Daemon

    try:
        code = Daemon(cfg).run()
    except config_mod.ConfigError as exc:  # a model's default method does not apply to its kind (start-up check)
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@app.command()
def health(config: ConfigOpt = None) -> None:
    """Exit 0 if the daemon's metrics endpoint answers and it is connected to the broker (for probes)."""
    import urllib.request

    cfg = load_config(config)
    host = "127.0.0.1" if cfg.metrics.host in ("0.0.0.0", "::") else cfg.metrics.host
    try:
        body = urllib.request.urlopen(f"http://{host}:{cfg.metrics.port}/metrics", timeout=3).read().decode()
    except OSError as exc:
        console.print(f"[red]unhealthy: metrics endpoint not answering ({exc})[/red]")
        raise typer.Exit(1) from None
    connected = any(line.startswith("unlearnd_broker_connected ") and float(line.split()[1]) == 1.0
                    for line in body.splitlines())
    if not connected:
        console.print("[red]unhealthy: not connected to the Kafka cluster[/red]")
        raise typer.Exit(1)
    console.print("healthy")


def _only_lm(cfg: config_mod.Config) -> str:
    lms = [name for name, m in cfg.models.items() if m.kind == "causal_lm"]
    if len(lms) != 1:
        console.print(f"[red]name the model: config has {len(lms)} causal_lm models {lms}[/red]")
        raise typer.Exit(2)
    return lms[0]


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Argument(help="A registered causal_lm model (default: the only one).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default [serve] host, 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default [serve] port).")] = None,
    route_only: Annotated[bool, typer.Option("--route-only", help="Serve /v1/route without loading the LM.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Serve the model over HTTP, routing each input through the unlearning adapters that apply to it."""
    cfg = load_config(config)
    setup_logging(cfg.logging)
    from daemon import serve as serve_mod

    serve_mod.serve(cfg, model or _only_lm(cfg), host=host, port=port, route_only=route_only)


@app.command()
def route(
    text: Annotated[str, typer.Argument(help="An input to route.")],
    model: Annotated[Optional[str], typer.Option(help="A registered causal_lm model (default: the only one).")] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Which adapters an input would get, and why (per-adapter scores), from the adapters topic's state."""
    from daemon import serve as serve_mod

    cfg = load_config(config)
    decision = serve_mod.route_text(cfg, model or _only_lm(cfg), text)
    if as_json:
        print(json.dumps(decision, indent=2, default=str))
    else:
        console.print_json(json.dumps(decision, default=str))


@app.command()
def publish(
    model: Annotated[str, typer.Option(help="Registered model name (also the message key).")],
    sample_ids: Annotated[Optional[str], typer.Option(help="Comma-separated training sample ids.")] = None,
    forget_class: Annotated[Optional[int], typer.Option("--class", help="Forget a whole class.")] = None,
    text: Annotated[Optional[list[str]], typer.Option("--text", help="A text to forget (repeatable).")] = None,
    qa: Annotated[Optional[Path], typer.Option(help="JSON file: [{\"question\": ..., \"answer\": ...}].")] = None,
    method: Annotated[Optional[str], typer.Option(help="Override the model's default method.")] = None,
    subject: Annotated[Optional[str], typer.Option(help="Data-subject id, for the audit trail.")] = None,
    request_id: Annotated[Optional[str], typer.Option(help="Idempotency key (generated when absent).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result event and print it.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 300.0,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Publish a deletion request to the requests topic (signed if an HMAC key is configured)."""
    import os

    from kafka import KafkaProducer

    from daemon import kafka_io, schema

    cfg = load_config(config)
    forget: dict = {}
    if sample_ids:
        forget["sample_ids"] = [int(s) for s in sample_ids.split(",") if s.strip()]
    if forget_class is not None:
        forget["class"] = forget_class
    if text:
        forget["texts"] = list(text)
    if qa:
        forget["qa"] = json.loads(qa.read_text())
    if len(forget) != 1:
        console.print("[red]give exactly one of --sample-ids, --class, --text, --qa[/red]")
        raise typer.Exit(2)
    body = {"request_id": request_id or f"req-{uuid.uuid4().hex[:12]}", "model": model, "forget": forget,
            "issued_at": datetime.now(timezone.utc).isoformat()}
    if method:
        body["method"] = method
    if subject:
        body["subject"] = subject
    key = os.environ.get(cfg.requests.hmac_key_env)
    if key:
        body["signature"] = schema.sign(body, key.encode())
    bootstrap = bootstrap_servers(cfg)
    waiter = _ResultWaiter(cfg, bootstrap) if wait else None  # subscribe before publishing: no race
    producer = KafkaProducer(**kafka_io.connection_settings(cfg.kafka, bootstrap), acks="all")
    producer.send(cfg.kafka.topics.requests, key=model.encode(), value=json.dumps(body).encode()).get(30)
    producer.close()
    if not wait:
        print(json.dumps({"request_id": body["request_id"], "published": True}) if as_json
              else f"published {body['request_id']}")
        return
    result = waiter.wait(body["request_id"], timeout)
    if result is None:
        console.print(f"[red]no result for {body['request_id']} within {timeout:.0f}s[/red]")
        raise typer.Exit(1)
    print_result(result, as_json)
    raise typer.Exit(0 if result["status"] == "applied" else 1)


class _ResultWaiter:
    def __init__(self, cfg: config_mod.Config, bootstrap: str):
        from kafka import KafkaConsumer, TopicPartition

        from daemon import kafka_io

        topic = cfg.kafka.topics.results
        self.consumer = KafkaConsumer(**kafka_io.connection_settings(cfg.kafka, bootstrap), enable_auto_commit=False)
        parts = self.consumer.partitions_for_topic(topic) or set()
        if not parts:  # the daemon creates topics on start; give it a moment
            deadline = time.monotonic() + 30
            while not parts and time.monotonic() < deadline:
                time.sleep(0.5)
                parts = self.consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        self.consumer.assign(tps)
        for tp in tps:  # start at the current end; position() forces the lookup now
            self.consumer.seek_to_end(tp)
            self.consumer.position(tp)

    def wait(self, request_id: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for records in self.consumer.poll(timeout_ms=500).values():
                    for rec in records:
                        event = json.loads(rec.value)
                        if event.get("request_id") == request_id:
                            return event
        finally:
            self.consumer.close()
        return None



# --- requests -----------------------------------------------------------------------------------------------


def _request_dict(r) -> dict:
    return {"request_id": r.request_id, "model": r.model, "method": r.method, "status": r.status,
            "attempts": r.attempts, "artifact_id": r.artifact_id, "forget_kind": r.forget_kind,
            "forget_count": r.forget_count, "subject": r.subject, "reason": r.reason, "error": r.error,
            "received": when(r.received_at), "completed": when(r.completed_at), "duration_s": r.duration_s,
            "body_sha256": r.body_sha256, "source": r.source, "metrics": r.metrics}


@requests_app.command("list")
def requests_list(model: Annotated[Optional[str], typer.Option()] = None,
                  status: Annotated[Optional[str], typer.Option()] = None,
                  limit: Annotated[int, typer.Option()] = 50, as_json: JsonOpt = False,
                  config: ConfigOpt = None) -> None:
    """Recent requests, newest first."""
    rows = [_request_dict(r) for r in open_ledger(load_config(config)).list_requests(model, status, limit)]
    emit(rows, ["request_id", "model", "method", "status", "artifact_id", "forget_count", "reason", "received",
                 "duration_s"], as_json, "requests")


@requests_app.command("show")
def requests_show(request_id: str, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One request with its measures (no raw forget data is ever stored)."""
    r = open_ledger(load_config(config)).get_request(request_id)
    if r is None:
        console.print(f"[red]no request {request_id}[/red]")
        raise typer.Exit(1)
    d = _request_dict(r)
    if as_json:
        print(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        if k != "metrics":
            console.print(f"[bold]{k}[/]: {fmt(v)}")
    print_metrics(d["metrics"])


# --- models -------------------------------------------------------------------------------------------------


@models_app.command("list")
def models_list(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Models in config.toml with their head version and counts from the ledger."""
    cfg = load_config(config)
    ledger = open_ledger(cfg)
    rows = []
    for name, spec in cfg.models.items():
        head = ledger.head(name)
        arts = ledger.list_artifacts(name)
        rows.append({"model": name, "kind": spec.kind, "method": spec.method, "head": head.id if head else None,
                     "versions": sum(a.kind == "version" for a in arts),
                     "active_adapters": sum(a.kind == "adapter" and a.active for a in arts),
                     "requests": len(ledger.list_requests(name, limit=1_000_000))})
    emit(rows, ["model", "kind", "method", "head", "versions", "active_adapters", "requests"], as_json, "models")


if __name__ == "__main__":
    app()

"""The `unlearnd` command: run the daemon, publish requests, inspect and roll back what it did.

Every listing prints a table, or JSON with `--json` for scripts. Commands that only read (versions, requests,
models) open the ledger directly and work whether or not the daemon is running.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from daemon import config as config_mod
from daemon.logs import setup_logging

app = typer.Typer(help="unlearnd: make deployed models forget data on request.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
versions_app = typer.Typer(help="Model versions (classifiers): list, show, roll back.", no_args_is_help=True)
requests_app = typer.Typer(help="Deletion requests recorded in the ledger.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models.", no_args_is_help=True)
adapters_app = typer.Typer(help="Unlearning adapters (language models): list, show, roll back, restore, export.",
                           no_args_is_help=True)
app.add_typer(versions_app, name="versions")
app.add_typer(requests_app, name="requests")
app.add_typer(models_app, name="models")
app.add_typer(adapters_app, name="adapters")

console = Console()
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="config.toml (default: ./config.toml "
                                                   "or $UNLEARND_CONFIG)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _config(path: Path | None) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _bootstrap(cfg: config_mod.Config) -> str:
    k = cfg.kafka
    return f"127.0.0.1:{k.embedded_port}" if k.bootstrap_servers == "embedded" else k.bootstrap_servers


def _ledger(cfg: config_mod.Config):
    from daemon.ledger import Ledger

    return Ledger(cfg.state.ledger_path, cfg.state.ledger_synchronous)


def _emit(rows: list[dict], columns: list[str], as_json: bool, title: str | None = None) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[_fmt(row.get(c)) for c in columns])
    console.print(table)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _when(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ts else None


# --- the daemon ---------------------------------------------------------------------------------------------


@app.command()
def run(config: ConfigOpt = None) -> None:
    """Run the daemon in the foreground (Ctrl-C or SIGTERM stops it cleanly)."""
    cfg = _config(config)
    setup_logging(cfg.logging)
    from daemon.app import Daemon

    raise typer.Exit(Daemon(cfg).run())


@app.command()
def health(config: ConfigOpt = None) -> None:
    """Exit 0 if the daemon's metrics endpoint answers and it is connected to the broker (for probes)."""
    import urllib.request

    cfg = _config(config)
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
    cfg = _config(config)
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

    cfg = _config(config)
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

    cfg = _config(config)
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
    bootstrap = _bootstrap(cfg)
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
    _print_result(result, as_json)
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


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    colour = {"applied": "green", "rejected": "yellow", "failed": "red"}.get(result["status"], "white")
    console.print(f"[bold {colour}]{result['status']}[/] {result.get('request_id')} on {result.get('model')}"
                  + (f" -> {result.get('version') or result.get('adapter_id')}" if result["status"] == "applied" else "")
                  + (f" ({result.get('duration_s'):.2f}s)" if result.get("duration_s") is not None else ""))
    if result.get("reason"):
        console.print(f"reason: {result['reason']}: {result.get('error')}")
    _print_metrics(result.get("metrics") or {})


def _print_metrics(m: dict) -> None:
    pairs = sorted({k[: -len("_before")] for k in m if k.endswith("_before")})
    if pairs:
        table = Table("measure", "before", "after")
        for name in pairs:
            table.add_row(name, _fmt(m.get(f"{name}_before")), _fmt(m.get(f"{name}_after")))
        console.print(table)
    rest = {k: v for k, v in m.items() if not k.endswith(("_before", "_after"))}
    if rest:
        console.print("  ".join(f"{k}={_fmt(v)}" for k, v in sorted(rest.items())))


# --- versions -----------------------------------------------------------------------------------------------


def _artifact_dict(a) -> dict:
    return {"id": a.id, "model": a.model, "kind": a.kind, "parent": a.parent, "request_id": a.request_id,
            "created": _when(a.created_at), "active": a.active, "sha256": a.sha256, "path": a.path,
            "metrics": a.metrics}


@versions_app.command("list")
def versions_list(model: str, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """The model's versions, oldest first; `active` marks the head that serves."""
    ledger = _ledger(_config(config))
    rows = [_artifact_dict(a) for a in ledger.list_artifacts(model, "version")]
    for r in rows:
        r["sha256"] = r["sha256"][:12]
    _emit(rows, ["id", "parent", "active", "request_id", "created", "sha256"], as_json, f"versions of {model}")


@versions_app.command("show")
def versions_show(version_id: str, model: Annotated[Optional[str], typer.Option(help="Model (if ids clash).")] = None,
                  as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One version: lineage, request, hash, measures, forgotten sample count."""
    ledger = _ledger(_config(config))
    a = ledger.get_artifact(model, version_id) if model else ledger.find_artifact(version_id)
    if a is None or a.kind != "version":
        console.print(f"[red]no version {version_id}[/red]")
        raise typer.Exit(1)
    d = _artifact_dict(a)
    d["lineage"] = [x.id for x in ledger.lineage(a.model, a.id)]
    d["forgotten_samples"] = len(ledger.forgotten_ids(a.model, a.id))
    if as_json:
        print(json.dumps(d, indent=2, default=str))
        return
    for k in ("id", "model", "active", "parent", "lineage", "request_id", "created", "sha256", "path",
              "forgotten_samples"):
        console.print(f"[bold]{k}[/]: {_fmt(d[k]) if not isinstance(d[k], list) else ' <- '.join(d[k])}")
    _print_metrics(d["metrics"])


@versions_app.command("rollback")
def versions_rollback(model: str, to: Annotated[str, typer.Option("--to", help="Version id to restore.")],
                      reason: Annotated[str, typer.Option(help="Why (kept in the audit trail).")] = "operator rollback",
                      as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Make an earlier version the head again (bit-exact weights); recorded in the ledger and announced.

    Samples forgotten by the versions after it are no longer forgotten by the served model: the ledger keeps
    them, and `requests list` shows which requests they came from, so they can be re-issued."""
    from adapters.store import ArtifactStore
    from daemon.models import ModelRegistry

    cfg = _config(config)
    ledger = _ledger(cfg)
    previous = ledger.head(model)
    registry = ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger)
    try:
        row = registry.rollback(model, to, reason=reason)
    except (KeyError, RuntimeError) as exc:
        console.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(1) from None
    announced = _announce(cfg, model, row.id, "rolled_back", {"kind": "version", "from": previous.id if previous
                                                              else None, "reason": reason, "sha256": row.sha256})
    out = {"model": model, "head": row.id, "from": previous.id if previous else None, "announced": announced}
    print(json.dumps(out)) if as_json else console.print(
        f"{model}: head {out['from']} -> [bold]{row.id}[/]" + ("" if announced else
                                                            " [yellow](recorded; announcement failed: broker down)[/]"))


def _announce(cfg: config_mod.Config, model: str, artifact_id: str, event: str, payload: dict) -> bool:
    """Publish an adapters-topic event; the ledger is already updated, so failure is reported, not fatal."""
    from kafka import KafkaProducer

    from daemon import kafka_io

    try:
        producer = KafkaProducer(**kafka_io.connection_settings(cfg.kafka, _bootstrap(cfg)), acks="all",
                                 max_block_ms=10_000)
        kafka_io.Outbox(producer, cfg.kafka).artifact_event(model, artifact_id, event, payload)
        producer.flush(10)
        producer.close()
        return True
    except Exception as exc:  # kafka-python raises several unrelated types for an unreachable cluster
        console.print(f"[yellow]could not announce on {cfg.kafka.topics.adapters}: {exc}[/yellow]", file=sys.stderr)
        return False


# --- adapters -----------------------------------------------------------------------------------------------


def _adapter(ledger, adapter_id: str, model: str | None):
    a = ledger.get_artifact(model, adapter_id) if model else ledger.find_artifact(adapter_id)
    if a is None or a.kind != "adapter":
        console.print(f"[red]no adapter {adapter_id}[/red]")
        raise typer.Exit(1)
    return a


ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Model (if adapter ids clash across models).")]


@adapters_app.command("list")
def adapters_list(model: Annotated[Optional[str], typer.Argument()] = None, as_json: JsonOpt = False,
                  config: ConfigOpt = None) -> None:
    """Adapters, oldest first; `active` ones are applied by serving (where the router says so)."""
    rows = [_artifact_dict(a) for a in _ledger(_config(config)).list_artifacts(model, "adapter")]
    for r in rows:
        r["sha256"] = r["sha256"][:12]
    _emit(rows, ["id", "model", "active", "request_id", "created", "sha256"], as_json, "adapters")


@adapters_app.command("show")
def adapters_show(adapter_id: str, model: ModelOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One adapter: request, size, rank, measures, and its overlap with every other active adapter."""
    from adapters import lora_set

    ledger = _ledger(_config(config))
    a = _adapter(ledger, adapter_id, model)
    d = _artifact_dict(a)
    path = Path(a.path)
    d["size_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    d["rank"] = json.loads((path / "adapter_config.json").read_text()).get("r")
    others = {o.id: o.path for o in ledger.list_artifacts(a.model, "adapter") if o.active and o.id != a.id}
    d["orthogonality"] = lora_set.orthogonality_report({a.id: a.path, **others}) if others else None
    if as_json:
        print(json.dumps(d, indent=2, default=str))
        return
    for k in ("id", "model", "active", "request_id", "created", "sha256", "path", "size_bytes", "rank"):
        console.print(f"[bold]{k}[/]: {_fmt(d[k])}")
    if d["orthogonality"]:
        console.print(f"[bold]max |cos| with other active adapters[/]: {d['orthogonality']['max_cosine']:.4f}")
    _print_metrics(d["metrics"])


def _set_adapter(adapter_id: str, model: str | None, active: bool, reason: str, as_json: bool,
                 config: Path | None) -> None:
    from adapters.store import ArtifactStore
    from daemon.models import ModelRegistry

    cfg = _config(config)
    ledger = _ledger(cfg)
    a = _adapter(ledger, adapter_id, model)
    try:
        row = ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger).set_adapter(
            a.model, a.id, active, reason=reason)
    except (KeyError, RuntimeError) as exc:
        console.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(1) from None
    event = "restored" if active else "rolled_back"
    announced = _announce(cfg, a.model, a.id, event, {"kind": "adapter", "reason": reason, "sha256": row.sha256,
                                                     "path": row.path})
    out = {"model": a.model, "adapter_id": a.id, "active": active, "announced": announced}
    print(json.dumps(out)) if as_json else console.print(f"{a.model}: adapter {a.id} {event}"
                                                         + ("" if announced else " [yellow](not announced)[/]"))


@adapters_app.command("rollback")
def adapters_rollback(adapter_id: str, model: ModelOpt = None,
                      reason: Annotated[str, typer.Option()] = "operator rollback", as_json: JsonOpt = False,
                      config: ConfigOpt = None) -> None:
    """Deactivate an adapter (the base and other adapters untouched); recorded and announced."""
    _set_adapter(adapter_id, model, False, reason, as_json, config)


@adapters_app.command("restore")
def adapters_restore(adapter_id: str, model: ModelOpt = None,
                     reason: Annotated[str, typer.Option()] = "operator restore", as_json: JsonOpt = False,
                     config: ConfigOpt = None) -> None:
    """Re-activate a rolled-back adapter (after checking its files against the recorded sha256)."""
    _set_adapter(adapter_id, model, True, reason, as_json, config)


@adapters_app.command("export")
def adapters_export(adapter_id: str, directory: Path, model: ModelOpt = None, config: ConfigOpt = None) -> None:
    """Copy an adapter in PEFT's own layout (loadable by peft, vLLM, LoRAX without unlearnd)."""
    import shutil

    a = _adapter(_ledger(_config(config)), adapter_id, model)
    shutil.copytree(a.path, directory, dirs_exist_ok=True)
    console.print(f"exported {a.id} to {directory}")


# --- requests -----------------------------------------------------------------------------------------------


def _request_dict(r) -> dict:
    return {"request_id": r.request_id, "model": r.model, "method": r.method, "status": r.status,
            "attempts": r.attempts, "artifact_id": r.artifact_id, "forget_kind": r.forget_kind,
            "forget_count": r.forget_count, "subject": r.subject, "reason": r.reason, "error": r.error,
            "received": _when(r.received_at), "completed": _when(r.completed_at), "duration_s": r.duration_s,
            "body_sha256": r.body_sha256, "source": r.source, "metrics": r.metrics}


@requests_app.command("list")
def requests_list(model: Annotated[Optional[str], typer.Option()] = None,
                  status: Annotated[Optional[str], typer.Option()] = None,
                  limit: Annotated[int, typer.Option()] = 50, as_json: JsonOpt = False,
                  config: ConfigOpt = None) -> None:
    """Recent requests, newest first."""
    rows = [_request_dict(r) for r in _ledger(_config(config)).list_requests(model, status, limit)]
    _emit(rows, ["request_id", "model", "method", "status", "artifact_id", "forget_count", "reason", "received",
                 "duration_s"], as_json, "requests")


@requests_app.command("show")
def requests_show(request_id: str, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One request with its measures (no raw forget data is ever stored)."""
    r = _ledger(_config(config)).get_request(request_id)
    if r is None:
        console.print(f"[red]no request {request_id}[/red]")
        raise typer.Exit(1)
    d = _request_dict(r)
    if as_json:
        print(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        if k != "metrics":
            console.print(f"[bold]{k}[/]: {_fmt(v)}")
    _print_metrics(d["metrics"])


# --- models -------------------------------------------------------------------------------------------------


@models_app.command("list")
def models_list(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Models in config.toml with their head version and counts from the ledger."""
    cfg = _config(config)
    ledger = _ledger(cfg)
    rows = []
    for name, spec in cfg.models.items():
        head = ledger.head(name)
        arts = ledger.list_artifacts(name)
        rows.append({"model": name, "kind": spec.kind, "method": spec.method, "head": head.id if head else None,
                     "versions": sum(a.kind == "version" for a in arts),
                     "active_adapters": sum(a.kind == "adapter" and a.active for a in arts),
                     "requests": len(ledger.list_requests(name, limit=1_000_000))})
    _emit(rows, ["model", "kind", "method", "head", "versions", "active_adapters", "requests"], as_json, "models")


if __name__ == "__main__":
    app()

"""The `unlearnd` command: run the daemon, serve, publish requests, and inspect what it did.

Every command that prints a result prints a table or text, or strict JSON with `--json` for scripts. Commands
that only read open the ledger directly and work whether or not the daemon is running. `versions` and `adapters`
live in cli_artifacts.py.

Exit codes: 0 success; 1 the command's answer is negative (unhealthy, rejected, nothing found, cluster
unreachable); 2 bad usage or configuration; 3 `publish --wait` saw no result in time (the request stays queued).
Expected failures print one line on stderr, never a traceback.
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

from daemon import config as config_mod
from daemon.config import bootstrap_servers
from daemon.cli_artifacts import adapters_app, versions_app
from daemon.cli_sample import sample
from daemon.cli_common import (CLIError, ConfigOpt, JsonOpt, console, dumps, emit, err_console, fail,
                               fmt, load_config, open_ledger, print_json, print_metrics, print_result, when)
from daemon.logs import setup_logging

NO_RESULT_EXIT = 3

app = typer.Typer(help="unlearnd: make deployed models forget data on request.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
requests_app = typer.Typer(help="Deletion requests recorded in the ledger.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models.", no_args_is_help=True)
app.add_typer(versions_app, name="versions")
app.add_typer(requests_app, name="requests")
app.add_typer(models_app, name="models")
app.add_typer(adapters_app, name="adapters")
app.command()(sample)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"unlearnd {version('unlearnd')}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                          help="Print the version and exit.")] = None) -> None:
    """unlearnd: make deployed models forget data on request."""


def main() -> None:
    """The `unlearnd` entry point: expected failures become one line on stderr and an exit code."""
    try:
        app()
    except CLIError as exc:
        err_console.print(f"[red]unlearnd: {exc}[/red]", highlight=False, soft_wrap=True)
        sys.exit(exc.code)


# --- the daemon ---------------------------------------------------------------------------------------------


@app.command()
def run(config: ConfigOpt = None) -> None:
    """Run the daemon in the foreground (Ctrl-C or SIGTERM stops it cleanly, also during first-start training)."""
    import logging

    cfg = load_config(config)
    setup_logging(cfg.logging)
    from daemon.app import Daemon, StartupError
    from daemon.state_lock import StateLocked

    logging.getLogger("unlearnd").info("config %s; state in %s", cfg.source, cfg.state.dir)
    try:
        code = Daemon(cfg).run()
    except (StartupError, StateLocked) as exc:  # StateLocked: one state directory, one daemon
        fail(str(exc))
    except config_mod.ConfigError as exc:  # a model's default method does not apply to its kind
        fail(str(exc), 2)
    raise typer.Exit(code)


@app.command()
def health(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Exit 0 if the daemon's metrics endpoint answers, it has finished start-up and is connected to the broker
    (for probes); otherwise say why (not answering, bootstrapping, broker unreachable) and exit 1."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    cfg = load_config(config)
    host = "127.0.0.1" if cfg.metrics.host in ("0.0.0.0", "::") else cfg.metrics.host
    url = f"http://{host}:{cfg.metrics.port}/metrics"
    try:
        body = urllib.request.urlopen(url, timeout=3).read().decode()
    except OSError as exc:
        status, detail = "unhealthy", f"metrics endpoint {url} not answering ({exc})"
    else:
        values = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples if not s.labels}
        if values.get("unlearnd_bootstrapping") == 1.0:
            status, detail = "bootstrapping", "building or loading its models (the first start trains them)"
        elif values.get("unlearnd_broker_connected") != 1.0:
            status, detail = "unhealthy", "not connected to the Kafka cluster"
        else:
            status, detail = "healthy", "consuming requests"
    if as_json:
        print_json({"status": status, "detail": detail, "metrics_url": url})
    else:
        colour = {"healthy": "green", "bootstrapping": "yellow"}.get(status, "red")
        console.print(f"[{colour}]{status}[/{colour}]: {detail}", highlight=False)
    raise typer.Exit(0 if status == "healthy" else 1)


def _only_lm(cfg: config_mod.Config) -> str:
    lms = [name for name, m in cfg.models.items() if m.kind == "causal_lm"]
    if len(lms) != 1:
        fail(f"name the model: {cfg.source} has {len(lms)} causal_lm models {lms}", 2)
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

    from kafka.errors import KafkaError
    from transformers.utils import logging as hf_logging

    cfg = load_config(config)
    hf_logging.disable_progress_bar()  # the encoder's loading bar is noise around one answer
    try:
        decision = serve_mod.route_text(cfg, model or _only_lm(cfg), text)
    except KafkaError as exc:
        fail(f"cannot read {cfg.kafka.topics.adapters} from {bootstrap_servers(cfg)} ({type(exc).__name__}: {exc})")
    if as_json:
        print_json(decision)
    else:
        console.print_json(dumps(decision))


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
    wait: Annotated[bool, typer.Option("--wait", help="Follow the request to its result and print it.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds for the whole command with --wait, a daemon still "
                                           "starting up included.")] = 300.0,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Publish a deletion request to the requests topic (signed if an HMAC key is configured).

    With --wait, progress of long requests (O3 training) goes to stderr and the result to stdout; exit 0 applied,
    1 rejected or failed, 3 no result within --timeout (the request stays queued and is applied later)."""
    import os

    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    from daemon import kafka_io, schema

    cfg = load_config(config)
    if cfg.models and model not in cfg.models:
        fail(f"unknown model {model!r}: {cfg.source} registers {', '.join(sorted(cfg.models))}", 2)
    body = {"request_id": request_id or f"req-{uuid.uuid4().hex[:12]}", "model": model,
            "forget": _forget(sample_ids, forget_class, text, qa), "issued_at": datetime.now(timezone.utc).isoformat()}
    if method:
        body["method"] = method
    if subject:
        body["subject"] = subject
    key = os.environ.get(cfg.requests.hmac_key_env)
    if key:
        body["signature"] = schema.sign(body, key.encode())
    deadline = time.monotonic() + timeout  # one budget for everything below
    bootstrap = bootstrap_servers(cfg)
    try:
        if cfg.kafka.create_topics:  # with the configured partition counts, before anything could auto-create them
            kafka_io.ensure_topics(cfg.kafka, bootstrap)
        waiter = _ResultWaiter(cfg, bootstrap, body["request_id"], deadline) if wait else None  # before publishing
        producer = KafkaProducer(**kafka_io.connection_settings(cfg.kafka, bootstrap), acks="all",
                                 max_block_ms=int(1000 * max(1.0, deadline - time.monotonic())))
        producer.send(cfg.kafka.topics.requests, key=model.encode(), value=json.dumps(body).encode()).get(
            max(1.0, deadline - time.monotonic()))
        producer.close()
    except KafkaError as exc:
        hint = (": is the daemon running? `unlearnd run` starts it with its embedded broker"
                if cfg.kafka.bootstrap_servers == "embedded" else "")
        fail(f"cannot publish to the Kafka cluster at {bootstrap} ({type(exc).__name__}: {exc}){hint}")
    if not wait:
        print(dumps({"request_id": body["request_id"], "published": True}) if as_json
              else f"published {body['request_id']}")
        return
    with _ProgressView(body["request_id"]) as view:
        result = waiter.wait(view.update)
    if result is None:
        fail(f"no result for {body['request_id']} within {timeout:.0f}s; it stays queued on "
             f"{cfg.kafka.topics.requests} and is applied when the daemon gets to it "
             f"(`unlearnd requests show {body['request_id']}`)", NO_RESULT_EXIT)
    print_result(result, as_json)
    raise typer.Exit(0 if result["status"] == "applied" else 1)


def _forget(sample_ids: str | None, forget_class: int | None, text: list[str] | None, qa: Path | None) -> dict:
    forget: dict = {}
    if sample_ids:
        try:
            forget["sample_ids"] = [int(s) for s in sample_ids.split(",") if s.strip()]
        except ValueError:
            fail(f"--sample-ids takes comma-separated integers, got {sample_ids!r}", 2)
    if forget_class is not None:
        forget["class"] = forget_class
    if text:
        forget["texts"] = list(text)
    if qa:
        try:
            forget["qa"] = json.loads(qa.read_text())
        except (OSError, ValueError) as exc:
            fail(f"--qa {qa}: {exc}", 2)
    if len(forget) != 1:
        fail("give exactly one of --sample-ids, --class, --text, --qa", 2)
    return forget


class _ResultWaiter:
    """Reads the results topic from its current end for one request's result, showing its progress events."""

    def __init__(self, cfg: config_mod.Config, bootstrap: str, request_id: str, deadline: float):
        from kafka import KafkaConsumer, TopicPartition

        from daemon import kafka_io

        self.request_id, self.deadline = request_id, deadline
        topic = cfg.kafka.topics.results
        self.consumer = KafkaConsumer(**kafka_io.connection_settings(cfg.kafka, bootstrap), enable_auto_commit=False)
        parts = self.consumer.partitions_for_topic(topic)
        found_by = max(deadline, time.monotonic() + 10)  # a topic created a moment ago may not be in metadata yet
        while not parts and time.monotonic() < found_by:
            time.sleep(0.2)
            parts = self.consumer.partitions_for_topic(topic)
        if not parts:
            self.consumer.close()
            fail(f"the results topic {topic} does not exist on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in parts]
        self.consumer.assign(tps)
        for tp in tps:  # start at the current end; position() forces the lookup now, before we publish
            self.consumer.seek_to_end(tp)
            self.consumer.position(tp)

    def wait(self, on_progress) -> dict | None:
        from daemon import kafka_io

        try:
            while time.monotonic() < self.deadline:
                for records in self.consumer.poll(timeout_ms=500).values():
                    for rec in records:
                        try:
                            event = json.loads(rec.value)
                        except (TypeError, ValueError):
                            continue
                        if not isinstance(event, dict) or event.get("request_id") != self.request_id:
                            continue
                        if kafka_io.is_progress(rec.headers, event):
                            on_progress(event)
                        else:
                            return event
        finally:
            self.consumer.close()
        return None


class _ProgressView:
    """Progress of the awaited request on stderr: a live status line on a terminal, one line per event otherwise."""

    def __init__(self, request_id: str):
        self.live = err_console.is_terminal
        self.status = err_console.status(f"waiting for the daemon to take {request_id}") if self.live else None

    def __enter__(self) -> "_ProgressView":
        if self.status:
            self.status.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.status:
            self.status.stop()

    def update(self, event: dict) -> None:
        text = describe_progress(event)
        if self.status:
            self.status.update(text)
        else:
            err_console.print(text, highlight=False)


def describe_progress(event: dict) -> str:
    where = f"{event.get('request_id')}: {event.get('method')} on {event.get('model')}"
    if event.get("stage") == "started":
        return f"{where}: started (attempt {event.get('attempt')})"
    eta = event.get("eta_s")
    return (f"{where}: epoch {event.get('epoch')}/{event.get('epochs')}, loss {fmt(event.get('loss'))}"
            + (f", about {eta:.0f}s left" if isinstance(eta, (int, float)) else ""))


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
        fail(f"no request {request_id}")
    d = _request_dict(r)
    if as_json:
        print_json(d)
        return
    for k, v in d.items():
        if k != "metrics":
            console.print(f"[bold]{k}[/]: {fmt(v)}")
    print_metrics(d["metrics"])


@requests_app.command("retry")
def requests_retry(request_id: str,
                   reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "operator retry",
                   as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Re-admit a failed request after fixing its cause: re-published from its dead-letter copy, applied once."""
    from daemon import retry

    cfg = load_config(config)
    try:
        out = retry.readmit(cfg, open_ledger(cfg), bootstrap_servers(cfg), request_id, reason)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        print_json(out)
    elif out["republished"]:
        console.print(f"re-admitted {request_id} and re-published it from {cfg.kafka.topics.dlq}")
    else:
        console.print(f"re-admitted {request_id}; no dead-letter copy on {cfg.kafka.topics.dlq} (retention? a "
                      "restarted embedded broker?): publish the original request again with the same request_id")


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
    main()

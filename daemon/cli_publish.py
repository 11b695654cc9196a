"""`unlearnd publish`: put a deletion request on the requests topic and, with --wait, follow it to its result.

Exit codes: 0 published (with --wait: applied); 1 rejected or failed, or the cluster is unreachable; 2 bad usage;
3 --wait saw no result in time (the request stays queued and is applied later).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from daemon import config as config_mod
from daemon.cli_common import (
    ConfigOpt,
    JsonOpt,
    check_kafka_secrets,
    dumps,
    err_console,
    fail,
    fmt,
    load_config,
    print_result,
    registered_model,
    shown,
)
from daemon.config import bootstrap_servers

NO_RESULT_EXIT = 3


def _seconds(value: float) -> float:
    if not (value > 0 and math.isfinite(value)):  # NaN fails `> 0` too
        raise typer.BadParameter(f"must be a number of seconds > 0, not {value:g}")
    return value


def publish(
    model: Annotated[str, typer.Option(help="Registered model name (also the message key).")],
    sample_ids: Annotated[str | None, typer.Option(help="Comma-separated training sample ids.")] = None,
    forget_class: Annotated[int | None, typer.Option("--class", min=0, help="Forget a whole class.")] = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="A text to forget (repeatable).")] = None,
    qa: Annotated[Path | None, typer.Option(help="JSON file: [{\"question\": ..., \"answer\": ...}].")] = None,
    image: Annotated[str | None, typer.Option(help="An image id to erase an object from (with --box).")] = None,
    box: Annotated[str | None, typer.Option(help="The object's box x0,y0,x1,y1 in pixels, ends exclusive.")] = None,
    method: Annotated[str | None, typer.Option(help="Override the model's default method.")] = None,
    subject: Annotated[str | None, typer.Option(help="Data-subject id, for the audit trail.")] = None,
    request_id: Annotated[str | None, typer.Option(help="Idempotency key (generated when absent).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the request to its result and print it.")] = False,
    timeout: Annotated[float, typer.Option(callback=_seconds, help="Seconds for the whole command with --wait, "
                                           "a daemon still starting up included (> 0).")] = 300.0,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Publish a deletion request to the requests topic (signed if an HMAC key is configured).

    With --wait, progress of long requests (O3 training) goes to stderr and the result to stdout; exit 0 applied,
    1 rejected or failed, 3 no result within --timeout (the request stays queued and is applied later)."""
    import os

    from kafka.errors import KafkaError

    from daemon import kafka_io, schema

    cfg = load_config(config)
    registered_model(cfg, model)
    rid = request_id or f"req-{uuid.uuid4().hex[:12]}"
    # No issued_at: the ledger records when the request arrived, and the same command sent again (a retry after
    # exit 3, say) must be the same body, which the daemon answers as a duplicate instead of a request_id conflict.
    body: dict[str, Any] = {"request_id": rid, "model": model,
                            "forget": _forget(sample_ids, forget_class, text, qa, image, box)}
    if method:
        body["method"] = method
    if subject:
        body["subject"] = subject
    key = os.environ.get(cfg.requests.hmac_key_env)
    if key:
        body["signature"] = schema.sign(body, key.encode())
    deadline = time.monotonic() + timeout  # one budget for everything below
    bootstrap = bootstrap_servers(cfg)
    check_kafka_secrets(cfg)
    try:
        if cfg.kafka.create_topics:  # with the configured partition counts, before anything could auto-create them
            kafka_io.ensure_topics(cfg.kafka, bootstrap)
        waiter = _ResultWaiter(cfg, bootstrap, rid, schema.body_sha256(body), deadline) if wait else None
        producer = kafka_io.make_cli_producer(cfg.kafka, bootstrap,
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
    assert waiter is not None  # made above whenever `wait`
    with _ProgressView(rid) as view:
        result = waiter.wait(view.update)
    if result is None:
        fail(f"no result for {body['request_id']} within {timeout:.0f}s; it stays queued on "
             f"{cfg.kafka.topics.requests} and is applied when the daemon gets to it "
             f"(`unlearnd requests show {body['request_id']}`)", NO_RESULT_EXIT)
    print_result(result, as_json)
    raise typer.Exit(0 if result["status"] == "applied" else 1)


def _forget(sample_ids: str | None, forget_class: int | None, text: list[str] | None,
            qa: Path | None, image: str | None = None, box: str | None = None) -> dict[str, Any]:
    forget: dict[str, Any] = {}
    if (image is None) != (box is None):
        fail("--image and --box go together", 2)
    if image is not None and box is not None:
        try:
            corners = [int(v) for v in box.split(",")]
        except ValueError:
            corners = []
        if len(corners) != 4 or min(corners) < 0:
            fail(f"--box takes four comma-separated integers x0,y0,x1,y1 (pixels, not negative), got {box!r}", 2)
        forget["image"], forget["mask"] = image, {"box": corners}
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
    if len(set(forget) - {"mask"}) != 1:  # the mask goes with the image: one forget kind
        fail("give exactly one of --sample-ids, --class, --text, --qa, --image", 2)
    return forget


class _ResultWaiter:
    """Reads the results topic from its current end for one request's result, showing its progress events. Made
    before publishing, so no answer can come before it reads. A result for the same id with another body digest is
    another message's (one that reused the id, by mistake or not): not this request's answer."""

    def __init__(self, cfg: config_mod.Config, bootstrap: str, request_id: str, body_sha256: str, deadline: float):
        from kafka import TopicPartition

        from daemon import kafka_io

        self.request_id, self.body_sha256, self.deadline = request_id, body_sha256, deadline
        topic = cfg.kafka.topics.results
        self.consumer = kafka_io.make_reader(cfg.kafka, bootstrap)
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

    def wait(self, on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
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
                        if event.get("body_sha256") not in (None, self.body_sha256):  # None: an older daemon
                            continue
                        if kafka_io.is_progress(rec.headers, event):
                            on_progress(event)
                        else:
                            return event
        finally:
            self.consumer.close()
        return None


class _ProgressView:
    """Progress of the awaited request on stderr: a live status line on a terminal, one line per event otherwise
    (the first says it is waiting: a model still bootstrapping can keep a request queued for minutes)."""

    def __init__(self, request_id: str):
        self.live = err_console.is_terminal
        self.waiting = f"waiting for the daemon to take {shown(request_id)}"
        self.status = err_console.status(self.waiting) if self.live else None

    def __enter__(self) -> _ProgressView:
        if self.status:
            self.status.start()
        else:
            err_console.print(self.waiting, highlight=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status:
            self.status.stop()

    def update(self, event: dict[str, Any]) -> None:
        text = describe_progress(event)
        if self.status:
            self.status.update(text)
        else:
            err_console.print(text, highlight=False)


def describe_progress(event: dict[str, Any]) -> str:
    where = f"{shown(event.get('request_id'))}: {shown(event.get('method'))} on {shown(event.get('model'))}"
    if event.get("stage") == "started":
        return f"{where}: started (attempt {shown(event.get('attempt'))})"
    eta = event.get("eta_s")
    return (f"{where}: epoch {shown(event.get('epoch'))}/{shown(event.get('epochs'))}, loss {fmt(event.get('loss'))}"
            + (f", about {eta:.0f}s left" if isinstance(eta, (int, float)) else ""))

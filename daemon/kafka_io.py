"""Kafka clients built from config, and the four kinds of message the daemon writes.

Everything broker-specific lives here so the same daemon runs against the embedded Tansu broker or any Kafka
cluster (Apache Kafka, Redpanda, MSK, Confluent): bootstrap servers, SASL and TLS settings pass straight
through to kafka-python. Every client unlearnd makes is built by a `make_*` function below, from the address
`daemon.config.bootstrap_servers` resolves (or the embedded broker's own, in the daemon that started it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewPartitions, NewTopic
from kafka.errors import IncompatibleBrokerVersion, TopicAlreadyExistsError, UnsupportedVersionError

from daemon import dead_letter
from daemon.config import ConfigError, Kafka
from daemon.dead_letter import HEADER_ERROR, HEADER_FAILED_AT, HEADER_REASON, HEADER_SOURCE  # noqa: F401 (re-export)
from daemon.schema import DeadLetterReason, Result

log = logging.getLogger(__name__)

HEADER_REKEYED_FROM = "unlearnd.rekeyed_from"
# On the results topic: "result" (exactly one per request, terminal) or "progress" (zero or more before it).
HEADER_EVENT = "unlearnd.event"
# What a produced record may add to a request-sized one: the dead letter's own headers, the batch framing.
PRODUCE_HEADROOM_BYTES = 256 * 1024
DEFAULT_MAX_RECORD_BYTES = 1_048_576  # requests.max_bytes' default, for callers without a Config


def connection_settings(cfg: Kafka, bootstrap: str) -> dict[str, Any]:
    """Settings every client shares: where the cluster is and how to authenticate."""
    settings: dict[str, Any] = {"bootstrap_servers": bootstrap.split(","), "client_id": cfg.client_id,
                                "security_protocol": cfg.security_protocol,
                                "reconnect_backoff_max_ms": int(cfg.reconnect_backoff_max_s * 1000)}
    if cfg.sasl_mechanism:
        settings["sasl_mechanism"] = cfg.sasl_mechanism
        settings["sasl_plain_username"] = cfg.sasl_plain_username
        settings["sasl_plain_password"] = os.environ.get(cfg.sasl_password_env)
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(cfg, key):
            settings[key] = getattr(cfg, key)
    return settings


def check_secrets(cfg: Kafka, environ: Mapping[str, str] = os.environ) -> None:
    """What a client needs from outside the config (files, a variable) is there; raises ConfigError. Checked when
    the daemon starts and before the CLI connects, not when the config loads: other commands need no cluster. A
    client would otherwise only fail to connect, which reads as an outage retried forever."""
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"kafka.{key}: no file {path}")
    if cfg.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        if not cfg.sasl_plain_username:
            raise ConfigError(f"kafka.sasl_plain_username: sasl_mechanism {cfg.sasl_mechanism} needs one")
        if not environ.get(cfg.sasl_password_env):
            raise ConfigError(f"kafka.sasl_mechanism {cfg.sasl_mechanism}: the password is read from "
                              f"${cfg.sasl_password_env} (kafka.sasl_password_env), which is not set")


def make_producer(cfg: Kafka, bootstrap: str, max_record_bytes: int) -> KafkaProducer:
    # Idempotent, acks=all: a result or DLQ record is written once per send even if the client retries.
    # (An idempotent producer cannot survive a broker that lost its state; the daemon recreates it then.)
    # max_request_size leaves room above the largest record the daemon ever writes (a request-sized dead letter
    # plus its headers), so a dead letter can always be delivered. No topic is ever created by sending to it.
    return KafkaProducer(**connection_settings(cfg, bootstrap), acks="all", enable_idempotence=True,
                         linger_ms=2, retries=5, max_request_size=max_record_bytes + PRODUCE_HEADROOM_BYTES,
                         allow_auto_create_topics=False)


def make_consumer(cfg: Kafka, bootstrap: str, topic: str, group_id: str | None = None) -> KafkaConsumer:
    # Manual commits only: an offset moves after the ledger row and the result are durable.
    static = {"group_instance_id": cfg.group_instance_id} if cfg.group_instance_id else {}
    consumer = KafkaConsumer(**static, **connection_settings(cfg, bootstrap), group_id=group_id or cfg.group_id,
                             enable_auto_commit=False, auto_offset_reset="earliest", allow_auto_create_topics=False,
                             session_timeout_ms=cfg.session_timeout_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                             max_poll_records=cfg.max_poll_records, max_poll_interval_ms=cfg.max_poll_interval_ms,
                             fetch_max_wait_ms=cfg.fetch_max_wait_ms,
                             isolation_level=cfg.isolation_level)
    # Subscribed by pattern, so that its metadata requests never name the topic: a broker that ignores
    # allow_auto_create_topics (Tansu) would otherwise re-create it with its own defaults when it comes back empty.
    consumer.subscribe(pattern=f"^{re.escape(topic)}$")
    return consumer


def make_reader(cfg: Kafka, bootstrap: str, **settings: Any) -> KafkaConsumer:
    """A consumer outside any consumer group that reads by assignment, committing nothing: the serving follower,
    `publish --wait`, the dead-letter lookup of `requests retry`. Not thread-safe: one thread uses it."""
    return KafkaConsumer(**{"fetch_max_wait_ms": cfg.fetch_max_wait_ms, **connection_settings(cfg, bootstrap),
                            "group_id": None, "enable_auto_commit": False, "isolation_level": cfg.isolation_level,
                            **settings})


def make_cli_producer(cfg: Kafka, bootstrap: str, **settings: Any) -> KafkaProducer:
    """A producer for the CLI's one-off writes (a request, a re-admitted request, an adapter event): acks=all."""
    return KafkaProducer(**connection_settings(cfg, bootstrap), acks="all", **settings)


def make_admin(cfg: Kafka, bootstrap: str, timeout_s: float | None = None) -> KafkaAdminClient:
    """An admin client; with `timeout_s`, its requests and its bootstrap give up after that long (a liveness probe
    must not hang on a frozen broker)."""
    if timeout_s is None:
        return KafkaAdminClient(**connection_settings(cfg, bootstrap))
    ms = max(1000, int(timeout_s * 1000))
    return KafkaAdminClient(**connection_settings(cfg, bootstrap), request_timeout_ms=ms, bootstrap_timeout_ms=ms)


def close_consumer(consumer: KafkaConsumer, *, timeout_ms: int) -> None:
    """Close without leaving the group: the broker expires this member after session_timeout_ms and hands its
    partitions on then, as it does for a member that was killed.

    A LeaveGroup sent while the group rebalances makes Tansu 0.6.0 (the embedded broker) keep the departed member
    recorded as the group's leader, and no member is given a partition again (tests/daemon/test_consumer_group.py).
    On Kafka the price of not leaving is one session timeout before a stopped replica's partitions move."""
    consumer._coordinator.reset_generation()  # kafka-python 3.0: no member id, so close() sends no LeaveGroup
    consumer.close(autocommit=False, timeout_ms=timeout_ms)


def ensure_topics(cfg: Kafka, bootstrap: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                  admin: KafkaAdminClient | None = None) -> None:
    """Create the four topics if missing, with the configured partitions; the adapters topic is compacted.

    Called on every (re)connect: a broker that lost its state gets them back before anything else can create
    them with its own defaults. A requests or results topic with fewer partitions than configured (created by
    someone else) is grown where the broker supports it, and reported where it does not."""
    t = cfg.topics
    dlq_limit = {"max.message.bytes": str(max_record_bytes + PRODUCE_HEADROOM_BYTES)}
    wanted = [
        NewTopic(t.requests, t.partitions, t.replication_factor),
        NewTopic(t.results, t.partitions, t.replication_factor),
        NewTopic(t.dlq, 1, t.replication_factor, topic_configs=dlq_limit),
        NewTopic(t.adapters, 1, t.replication_factor, topic_configs={"cleanup.policy": "compact"}),
    ]
    own = admin is None
    admin = admin or make_admin(cfg, bootstrap)
    try:
        _create_missing(admin, wanted, t.partitions)
    finally:
        if own:
            admin.close()


def _create_missing(admin: KafkaAdminClient, wanted: list[NewTopic], partitions: int) -> None:
    # describe_topics(None) lists every topic without naming any: naming a missing topic would let a broker that
    # ignores allow_auto_topic_creation (Tansu) create it with its own defaults.
    existing = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(None)}
    missing = [nt for nt in wanted if nt.name not in existing]
    if missing:
        try:
            admin.create_topics(missing)
        except TopicAlreadyExistsError:  # another replica won the race
            pass
        log.info("created topics %s", [nt.name for nt in missing])
    for name in (wanted[0].name, wanted[1].name):  # requests and results: their partitions are the parallelism
        have = existing.get(name)
        if have is not None and have > partitions:
            log.warning("topic %s has %d partitions, not kafka.topics.partitions = %d (created by another client "
                        "with the broker's defaults?)", name, have, partitions)
        elif have is not None and have < partitions:
            try:
                admin.create_partitions({name: NewPartitions(partitions)})
                log.warning("topic %s had %d partitions; grew it to kafka.topics.partitions = %d", name, have,
                            partitions)
            except (IncompatibleBrokerVersion, UnsupportedVersionError):
                log.warning("topic %s has %d partitions, not kafka.topics.partitions = %d (created by another "
                            "client?), and this broker cannot add partitions: recreate it to scale out", name, have,
                            partitions)


class Outbox:
    """Writes results, dead letters, re-keyed requests and adapter events. `flush()` before committing offsets."""

    def __init__(self, producer: KafkaProducer, cfg: Kafka, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES):
        self.producer = producer
        self.topics = cfg.topics
        self.max_record_bytes = max_record_bytes

    def result(self, result: Result, key: str | None) -> None:
        self.producer.send(self.topics.results, key=_b(key), value=result.to_bytes(),
                           headers=[(HEADER_EVENT, b"result")])

    def progress(self, request_id: str, model: str, method: str, info: dict[str, Any], body_sha256: str) -> None:
        """A non-terminal progress event of a long request (e.g. one O3 training epoch), on the results topic
        with header unlearnd.event=progress and no `status` field; the request's one result follows later."""
        body = {"event": "progress", "request_id": request_id, "model": model, "method": method,
                "body_sha256": body_sha256, "at": time.time(),
                **{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in info.items()}}
        self.producer.send(self.topics.results, key=_b(model), value=json.dumps(body).encode(),
                           headers=[(HEADER_EVENT, b"progress")])

    def dead_letter(self, raw: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes | None]], *,
                    reason: DeadLetterReason, error: str, source: str) -> None:
        """The original bytes, key and headers, plus why: an operator can fix and replay it unchanged (a record
        too large to copy keeps its start, hash and size instead; daemon/dead_letter.py)."""
        key, value, headers = dead_letter.build(raw, key, list(headers or []), reason=reason, error=error,
                                                source=source, budget=self.max_record_bytes)
        self.producer.send(self.topics.dlq, key=key, value=value, headers=headers)

    def rekey(self, raw: bytes, headers: list[tuple[str, bytes | None]], *, model: str, source: str) -> None:
        """Re-publish a request keyed by its model, so that the model's partition owner applies it."""
        headers = [(k, v) for k, v in dead_letter.sendable(headers) if k != HEADER_REKEYED_FROM]
        self.producer.send(self.topics.requests, key=model.encode(), value=raw,
                           headers=headers + [(HEADER_REKEYED_FROM, source.encode())])

    def artifact_event(self, model: str, artifact_id: str, event: str, payload: dict[str, Any]) -> None:
        """published | rolled_back | restored, keyed model/artifact so compaction keeps the latest state."""
        body = {"model": model, "artifact_id": artifact_id, "event": event, "at": time.time(), **payload}
        self.producer.send(self.topics.adapters, key=f"{model}/{artifact_id}".encode(),
                           value=json.dumps(body).encode())

    def flush(self, timeout: float = 30.0) -> None:
        self.producer.flush(timeout)


def is_progress(headers: dead_letter.Headers | None, event: dict[str, Any]) -> bool:
    """Whether a results-topic record is a progress event rather than the request's result."""
    return dict(headers or []).get(HEADER_EVENT) == b"progress" or event.get("event") == "progress"


def lag_by_partition(consumer: KafkaConsumer) -> dict[TopicPartition, int]:
    """Lag from the high-water marks of fetch responses and our positions (end_offsets() is unreliable on Tansu)."""
    lag = {}
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is not None:
            lag[tp] = max(0, high - consumer.position(tp))
    return lag


def _b(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None

"""Kafka clients built from config, and the four kinds of message the daemon writes.

Everything broker-specific lives here so the same daemon runs against the embedded Tansu broker or any Kafka
cluster (Apache Kafka, Redpanda, MSK, Confluent): bootstrap servers, SASL and TLS settings pass straight
through to kafka-python.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from daemon.config import Kafka
from daemon.schema import Result

log = logging.getLogger(__name__)

HEADER_REASON = "unlearnd.reason"
HEADER_ERROR = "unlearnd.error"
HEADER_SOURCE = "unlearnd.source"
HEADER_FAILED_AT = "unlearnd.failed_at"
# On the results topic: "result" (exactly one per request, terminal) or "progress" (zero or more before it).
HEADER_EVENT = "unlearnd.event"


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


def make_producer(cfg: Kafka, bootstrap: str) -> KafkaProducer:
    # Idempotent, acks=all: a result or DLQ record is written once per send even if the client retries.
    # (An idempotent producer cannot survive a broker that lost its state; the daemon recreates it then.)
    return KafkaProducer(**connection_settings(cfg, bootstrap), acks="all", enable_idempotence=True,
                         linger_ms=2, retries=5)


def make_consumer(cfg: Kafka, bootstrap: str, topic: str, group_id: str | None = None) -> KafkaConsumer:
    # Manual commits only: an offset moves after the ledger row and the result are durable.
    static = {"group_instance_id": cfg.group_instance_id} if cfg.group_instance_id else {}
    return KafkaConsumer(topic, **static, **connection_settings(cfg, bootstrap), group_id=group_id or cfg.group_id,
                         enable_auto_commit=False, auto_offset_reset="earliest",
                         session_timeout_ms=cfg.session_timeout_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                         max_poll_records=cfg.max_poll_records,
                         # A request can take minutes (model training); the group must not evict us meanwhile.
                         max_poll_interval_ms=30 * 60 * 1000)


def ensure_topics(cfg: Kafka, bootstrap: str) -> None:
    """Create the four topics if missing; the adapters topic is compacted (latest state per key)."""
    t = cfg.topics
    wanted = [
        NewTopic(t.requests, t.partitions, t.replication_factor),
        NewTopic(t.results, t.partitions, t.replication_factor),
        NewTopic(t.dlq, 1, t.replication_factor),
        NewTopic(t.adapters, 1, t.replication_factor, topic_configs={"cleanup.policy": "compact"}),
    ]
    admin = KafkaAdminClient(**connection_settings(cfg, bootstrap))
    try:
        existing = set(admin.list_topics())
        missing = [nt for nt in wanted if nt.name not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:  # another replica won the race
                pass
            log.info("created topics %s", [nt.name for nt in missing])
    finally:
        admin.close()


class Outbox:
    """Writes results, dead letters and adapter events. `flush()` before committing offsets."""

    def __init__(self, producer: KafkaProducer, cfg: Kafka):
        self.producer = producer
        self.topics = cfg.topics

    def result(self, result: Result, key: str | None) -> None:
        self.producer.send(self.topics.results, key=_b(key), value=result.to_bytes(),
                           headers=[(HEADER_EVENT, b"result")])

    def progress(self, request_id: str, model: str, method: str, info: dict) -> None:
        """A non-terminal progress event of a long request (e.g. one O3 training epoch), on the results topic
        with header unlearnd.event=progress and no `status` field; the request's one result follows later."""
        body = {"event": "progress", "request_id": request_id, "model": model, "method": method, "at": time.time(),
                **{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in info.items()}}
        self.producer.send(self.topics.results, key=_b(model), value=json.dumps(body).encode(),
                           headers=[(HEADER_EVENT, b"progress")])

    def dead_letter(self, raw: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]], *, reason: str,
                    error: str, source: str) -> None:
        """The original bytes, key and headers, plus why: an operator can fix and replay it unchanged."""
        extra = [(HEADER_REASON, reason.encode()), (HEADER_ERROR, error.encode()[:1000]),
                 (HEADER_SOURCE, source.encode()), (HEADER_FAILED_AT, str(time.time()).encode())]
        self.producer.send(self.topics.dlq, key=key, value=raw, headers=list(headers or []) + extra)

    def artifact_event(self, model: str, artifact_id: str, event: str, payload: dict) -> None:
        """published | rolled_back | restored, keyed model/artifact so compaction keeps the latest state."""
        body = {"model": model, "artifact_id": artifact_id, "event": event, "at": time.time(), **payload}
        self.producer.send(self.topics.adapters, key=f"{model}/{artifact_id}".encode(),
                           value=json.dumps(body).encode())

    def flush(self, timeout: float = 30.0) -> None:
        self.producer.flush(timeout)


def reachable(bootstrap: str) -> bool:
    """Whether any of the bootstrap servers accepts a TCP connection (kafka-python's clients keep retrying a lost
    broker in silence; this is how the daemon and the serving follower notice it)."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            continue
    return False


def is_progress(headers, event: dict) -> bool:
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

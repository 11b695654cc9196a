"""`unlearnd requests retry ID`: re-admit a failed request once its cause is fixed.

The ledger holds no request body (it never stores forget data), but the dead-letter topic holds the failed
request's original record. Retry marks the ledger row `readmitted` (the id may be applied once more, with a fresh
budget of engine failures), then re-publishes that record, keyed by its model, to the requests topic. Without a
dead-letter copy (retention, a wiped broker) the row is still re-admitted, and the producer re-sends the request
with the same request_id.
"""

from __future__ import annotations

import json
import time
from typing import Any

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from daemon import kafka_io
from daemon.config import Config
from daemon.dead_letter import HEADER_REASON
from daemon.ledger import Ledger
from daemon.schema import DeadLetterReason

READ_IDLE_S = 2.0  # the dead-letter topic is read to its end: this long without a record is the end


def readmit(cfg: Config, ledger: Ledger, bootstrap: str, request_id: str, reason: str) -> dict[str, Any]:
    """Re-admit `request_id` (it must be `failed`) and re-publish its dead-letter copy when one is found."""
    row = ledger.get_request(request_id)
    if row is None or row.status != "failed":
        raise ValueError(f"request {request_id} is {row.status if row else 'unknown'}, not failed: only failed "
                         "requests are retried")
    copy = find_dead_letter(cfg, bootstrap, request_id)
    ledger.readmit(request_id, reason=reason)
    if copy is not None:
        producer = kafka_io.make_cli_producer(cfg.kafka, bootstrap, allow_auto_create_topics=False)
        try:
            headers = [(k, v) for k, v in copy.headers or [] if not k.startswith("unlearnd.") and v is not None]
            producer.send(cfg.kafka.topics.requests, key=(row.model or "").encode(), value=copy.value,
                          headers=headers).get(30)
        finally:
            producer.close()
    return {"request_id": request_id, "status": "readmitted", "republished": copy is not None}


def find_dead_letter(cfg: Config, bootstrap: str, request_id: str) -> ConsumerRecord | None:
    """The newest `engine_failed` dead letter of `request_id`, or None."""
    consumer = kafka_io.make_reader(cfg.kafka, bootstrap, allow_auto_create_topics=False)
    try:
        topic = cfg.kafka.topics.dlq
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not tps:
            return None
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        found, last_seen = None, time.monotonic()
        while time.monotonic() - last_seen < READ_IDLE_S:
            for records in consumer.poll(timeout_ms=300).values():
                last_seen = time.monotonic()
                for rec in records:
                    reason = dict(rec.headers or []).get(HEADER_REASON)
                    if reason == DeadLetterReason.ENGINE_FAILED.encode() and _request_id(rec.value) == request_id:
                        found = rec
        return found
    finally:
        consumer.close()


def _request_id(value: bytes | None) -> str | None:
    try:
        body = json.loads(value or b"")
    except ValueError:
        return None
    return body.get("request_id") if isinstance(body, dict) else None

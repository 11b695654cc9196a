"""Admission: what becomes of a polled record before any engine work, in the order of DESIGN.md's data flow::

    already answered? -> decode (record, then body) -> validate (model, method, forget) -> re-key -> dedupe

A record that fails any step is answered here (a dead letter with its reason, a repeated answer, a re-keyed copy)
and never reaches an engine; one that passes is `Admitted`: a new request to apply.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

from kafka.consumer.fetcher import ConsumerRecord

from adapters.base import Forget, InvalidForget
from daemon import metrics, record_decoding
from daemon.config import FORGET_KINDS, Config
from daemon.dead_letter import Headers, record_size
from daemon.ledger import Ledger
from daemon.models import ModelRegistry, UnknownModel
from daemon.outcomes import Outcomes
from daemon.schema import DeadLetterReason, Rejected, Request, decode, forget_reason


@dataclass
class Message:
    """One polled record and where it came from (for the DLQ, the audit trail and redelivery checks)."""

    raw: bytes | None
    key: bytes | None
    headers: Headers
    source: str
    polled_at: float = field(default_factory=time.perf_counter)
    topic: str = ""
    partition: int = -1
    offset: int = -1
    timestamp: int = -1

    @classmethod
    def of(cls, r: ConsumerRecord) -> Message:
        return cls(r.value, r.key, list(r.headers or []), f"{r.topic}/{r.partition}/{r.offset}", topic=r.topic,
                   partition=r.partition, offset=r.offset, timestamp=r.timestamp)

    @property
    def size(self) -> int:
        return record_size(self.key, self.raw, self.headers)

    @property
    def fingerprint(self) -> str:
        """Tells this record from a new one at the same offset (a wiped broker reuses offsets)."""
        h = hashlib.sha256(str(self.timestamp).encode())
        for part in (self.key, self.raw):
            h.update(b"\0" if part is None else len(part).to_bytes(8, "big") + part)
        return h.hexdigest()


@dataclass
class Admitted:
    """A message that passed validation and dedupe: a new request to apply."""

    msg: Message
    request: Request
    method: str
    body_hash: str
    index: int = 0  # position in its partition batch
    suspect: bool = False  # it was in hand when a daemon died: apply it in a child process

    @property
    def forget(self) -> Forget:
        return self.request.forget.to_forget()


class Admission:
    def __init__(self, config: Config, registry: ModelRegistry, ledger: Ledger, outcomes: Outcomes,
                 not_suspect: set[str]):
        self.config = config
        self.registry = registry
        self.ledger = ledger
        self.outcomes = outcomes
        self.not_suspect = not_suspect  # ids this process interrupted cleanly (a pause, a stop): no crash
        self._marks: dict[int, str] = {}  # offset -> fingerprint of the batch's records answered before a crash
        key_env = config.requests.hmac_key_env
        self._hmac_key = os.environ[key_env].encode() if os.environ.get(key_env) else None

    def start_batch(self, msgs: list[Message]) -> None:
        """Before a partition batch: which of its records were answered (flushed) before a crash."""
        first = msgs[0] if msgs else None
        self._marks = self.ledger.answered_between(first.topic, first.partition, first.offset,
                                                   msgs[-1].offset) if first and first.offset >= 0 else {}

    def admit(self, msg: Message, index: int = 0) -> Admitted | None:
        """validate -> re-key -> dedupe. Returns a request to apply, or None when the message was answered."""
        if msg.offset in self._marks and self._marks[msg.offset] == msg.fingerprint:
            metrics.REDELIVERED.inc()  # answered and flushed before a crash: answering again would repeat it
            return None
        request, body_hash = None, None
        try:
            request, body_hash = self._decode(msg)
            method = self._validate_target(request)
        except Rejected as rej:
            self.outcomes.rejected(msg, rej, request=request, body_hash=body_hash)
            return None
        if self.config.requests.rekey_unkeyed and msg.key != request.model.encode():
            self.outcomes.rekeyed(msg, request.model, method, request.request_id)
            return None
        seen = self.ledger.get_request(request.request_id)
        if seen is not None and seen.status in ("applied", "failed"):
            if seen.body_sha256 == body_hash:
                self.outcomes.duplicate(seen, msg)
            else:  # a rejected, re-admitted or unfinished id may come back corrected; a finished one may not
                self.outcomes.rejected(msg, Rejected(DeadLetterReason.REQUEST_ID_CONFLICT, f"request_id already "
                                                     f"{seen.status} with a different body", request.request_id,
                                                     request.model), method=method, body_hash=body_hash,
                                      record=False)
            return None
        # A rejected request sent again is judged afresh (its cause may be fixed: a model added, a key set).
        suspect = (seen is not None and seen.status == "processing" and request.request_id not in self.not_suspect)
        if suspect and not self.config.requests.isolate_suspects:
            # Without a child process the daemon cannot tell who killed it; the request in hand takes the blame.
            self.ledger.record_engine_failure(request.request_id, "the daemon died while applying it")
            suspect = False
        return Admitted(msg, request, method, body_hash, index=index, suspect=suspect)

    def _decode(self, msg: Message) -> tuple[Request, str]:
        """The message's request, or Rejected: for its record (size, header keys), then its body."""
        max_bytes = self.config.requests.max_bytes
        for k, v in msg.headers:  # what daemon/record_decoding.py made of a record kafka-python could not read
            if record_decoding.written_here(k, record_decoding.UNDECODABLE_RECORD_HEADER):
                raise Rejected(DeadLetterReason.UNDECODABLE_RECORD,
                               f"{msg.source}: {(v or b'').decode('utf-8', 'replace')}")
            if record_decoding.written_here(k, record_decoding.UNDECODABLE_KEY_PREFIX):
                raise Rejected(DeadLetterReason.UNDECODABLE_RECORD, f"{msg.source}: a header key is not UTF-8 (the "
                                                                    "dead letter spells its bytes in hex)")
        if msg.size > max_bytes:
            raise Rejected(DeadLetterReason.OVERSIZE, f"record of {msg.size} bytes (key, value and headers) > "
                                                      f"requests.max_bytes = {max_bytes}")
        return decode(msg.raw, max_bytes=max_bytes, hmac_key=self._hmac_key)

    def _validate_target(self, request: Request) -> str:
        """The method that applies the request, or Rejected: unknown model or method, a forget the model refuses."""
        try:
            spec = self.registry.spec(request.model)
        except UnknownModel as exc:
            raise Rejected(DeadLetterReason.UNKNOWN_MODEL, str(exc), request.request_id, request.model,
                           request.method) from None
        forget = request.forget.to_forget()
        method = self.registry.method_for(request.model, request.method, forget.kind)
        try:
            engine = self.registry.engine(method, request.model)
        except KeyError as exc:
            raise Rejected(DeadLetterReason.UNKNOWN_METHOD, str(exc.args[0]), request.request_id,
                           request.model, method) from None
        try:
            self.registry.precheck(request.model, forget)
        except InvalidForget as exc:
            raise Rejected(forget_reason(exc), str(exc), request.request_id, request.model, method) from None
        if forget.kind not in FORGET_KINDS[spec.kind]:  # refused here: never an engine attempt
            raise Rejected(DeadLetterReason.INVALID_FORGET, f"model {request.model!r} is a {spec.kind} model: it "
                           f"takes {' or '.join(FORGET_KINDS[spec.kind])} requests, not {forget.kind}",
                           request.request_id, request.model, method)
        if spec.kind not in engine.model_kinds:
            raise Rejected(DeadLetterReason.UNKNOWN_METHOD, f"method {method!r} does not apply to {spec.kind} models",
                           request.request_id, request.model, method)
        served = spec.methods_served(forget.kind)
        if method not in served:
            raise Rejected(DeadLetterReason.METHOD_NOT_ALLOWED,
                           f"model {request.model!r} serves {forget.kind} requests with {' or '.join(served)}, not "
                           f"{method!r} (a request without \"method\" gets {served[0]}; an operator may allow "
                           f"others in models.{request.model}.allowed_methods.{forget.kind})",
                           request.request_id, request.model, method)
        if request.forget.size() > self.config.requests.max_forget_items:
            raise Rejected(DeadLetterReason.SCHEMA, f"forget names {request.forget.size()} items > "
                                                    "requests.max_forget_items", request.request_id, request.model,
                           method)
        return method

"""Every answer the daemon gives, each written in one place: the ledger row, the result event, the dead letter and
the metrics of an applied, unchanged, rejected, failed, duplicate or re-keyed request, and its progress events.

It also remembers which answered records are not yet marked in the ledger: answers are flushed, then marked, so
that a record redelivered after a crash (before its offset was committed) is not answered twice.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from adapters.base import CRITERION_MET, NothingToForget, engine_names
from daemon import kafka_io, metrics
from daemon.config import Config
from daemon.ledger import ArtifactRow, Ledger, RequestRow
from daemon.schema import DeadLetterReason, Rejected, Request, Result

if TYPE_CHECKING:
    from daemon.admission import Admitted, Message
    from daemon.models import Committed

log = logging.getLogger("unlearnd")

UNMARKED_MAX_S = 0.5  # answers older than this are flushed and marked before the next engine step
#: The error of a re-sent request whose change an operator rolled back since: what it forgot is served again.
_ROLLED_BACK = ("applied in {artifact}, which a rollback has since taken out of what {model} serves: the model knows "
                "this data again; to forget it on the current head, send the request again under a new request_id")


class Outcomes:
    """The daemon's one reporter: each public method answers one kind of outcome completely."""

    def __init__(self, config: Config, ledger: Ledger):
        self.config = config
        self.ledger = ledger
        self.outbox: kafka_io.Outbox | None = None  # the current connection's (set on every connect)
        self._unmarked: list[Message] = []  # answered, answers not yet flushed and marked in the ledger
        self._unmarked_since = 0.0
        self._rollback_seq = 0  # last audit event counted into unlearnd_rollbacks_total

    # --- applied ----------------------------------------------------------------------------------------------

    def record_applied(self, a: Admitted, artifact_id: str, change: Any, duration: float) -> None:
        """The ledger row of an applied request: written inside the transaction that records its artifact."""
        self._record(a.request.request_id, "applied", model=a.request.model, method=a.method,
                     subject=a.request.subject, body_sha256=a.body_hash, artifact_id=artifact_id,
                     metrics=change.metrics, duration_s=duration, source=a.msg.source)

    def applied(self, group: list[Admitted], committed: Committed, change: Any, target: Any,
                durations: dict[str, float]) -> None:
        """One result per request (their ledger rows are already committed), one artifact event, the metrics."""
        is_version = committed.kind == "version"
        for a in group:
            rid = a.request.request_id
            self._result(a.request.model, request_id=rid, model=a.request.model, status="applied", method=a.method,
                         artifact_id=committed.artifact_id, artifact_kind=committed.kind, measures=change.metrics,
                         duration_s=durations[rid], subject=a.request.subject, changed=True,
                         receipt=committed.receipt, body_sha256=a.body_hash)
            metrics.REQUESTS.labels(a.request.model, a.method, "applied").inc()
            metrics.REQUEST_SECONDS.labels(a.request.model, a.method).observe(durations[rid])
            log.info("request %s applied with %s: %s %s in %.3fs", rid, a.method, committed.kind, committed.artifact_id,
                     durations[rid])
            if change.metrics.get(CRITERION_MET) == 0.0:
                metrics.SHORT_OF_CRITERION.labels(a.request.model, a.method).inc()
                log.warning("request %s: %s stopped short of its test of forgetting (criterion_met = 0); the "
                            "forget set may still look seen: see the result's measures", rid, a.method)
        model = group[0].request.model
        self._out.artifact_event(model, committed.artifact_id, "published",
                                   {"kind": committed.kind, "parent": getattr(target, "version", None)
                                    if is_version else None,
                                    "request_id": group[0].request.request_id,
                                    "request_ids": [a.request.request_id for a in group],
                                    "sha256": committed.sha256, "path": str(committed.path)})
        metrics.LAST_APPLIED.labels(model).set(time.time())
        self.update_model_gauges(model)
        for a in group:
            self.answered(a.msg)

    def unchanged(self, a: Admitted, target: Any, exc: NothingToForget) -> None:
        """Everything the request names is already forgotten: it is satisfied as it stands. Answered `applied`
        with the current head and `changed: false`; no new version."""
        request = a.request
        head = getattr(target, "version", None)
        duration = time.perf_counter() - a.msg.polled_at
        measures = {"forgotten": 0.0, "already_forgotten": float(exc.already_forgotten)}
        self._record(request.request_id, "applied", model=request.model, method=a.method, subject=request.subject,
                     body_sha256=a.body_hash, artifact_id=head, metrics=measures, duration_s=duration,
                     source=a.msg.source)
        self._result(request.model, request_id=request.request_id, model=request.model, status="applied",
                     method=a.method, artifact_id=head, artifact_kind="version", measures=measures,
                     duration_s=duration, subject=request.subject, changed=False, body_sha256=a.body_hash)
        metrics.REQUESTS.labels(request.model, a.method, "applied").inc()
        log.info("request %s applied without change: every named sample is already forgotten by %s",
                 request.request_id, head)
        self.answered(a.msg)

    def progress(self, a: Admitted, info: dict[str, Any]) -> None:
        """A long request's progress: a log line and, unless turned off, a progress event on the results topic."""
        rid = a.request.request_id
        if info.get("stage") == "started":
            log.info("request %s: %s started (attempt %s)", rid, a.method, info.get("attempt"))
        else:
            log.info("request %s: %s epoch %s/%s, loss %.3f, %.0fs elapsed, about %.0fs left", rid, a.method,
                     info.get("epoch"), info.get("epochs"), info.get("loss", float("nan")), info.get("elapsed_s", 0),
                     info.get("eta_s", 0))
        if self.config.requests.progress_events:
            try:
                self._out.progress(rid, a.request.model, a.method, info, a.body_hash)
                self._out.producer.flush(5)  # a waiting client should see it now, not with the result
            except Exception as exc:  # progress is best effort: it must never fail the request it reports on
                log.debug("progress event of %s not sent: %s", rid, exc)

    # --- not applied ------------------------------------------------------------------------------------------

    def rejected(self, msg: Message, rej: Rejected, *, method: str | None = None, body_hash: str | None = None,
                 request: Request | None = None, record: bool = True) -> None:
        """`method`: the engine that would have applied it; `request` and `body_hash`, where its body was read:
        the ledger row says what was asked (kind, count, body digest) as an applied request's row does."""
        asked, digest = method or rej.method, body_hash or rej.body_sha256
        # a method no engine has is the requester's text: quoted (repr), so it cannot start a line or hide in one
        log.warning("rejected message %s: %s (request_id=%s%s)", msg.source, rej.reason, rej.request_id,
                    "" if not asked else f", method={asked}" if asked in engine_names() else f", method={asked!r}")
        # The ledger first: if it cannot be written (a full disk), nothing was sent and the message comes again.
        if record and rej.request_id and not self._owned_by_another(rej.request_id, digest):
            self._record(rej.request_id, "rejected", model=rej.model, method=asked, body_sha256=digest,
                         reason=rej.reason, error=rej.detail, source=msg.source,
                         subject=request.subject if request else None,
                         forget_kind=request.forget.to_forget().kind if request else None,
                         forget_count=request.forget.size() if request else None)
        else:  # no id to file it under, or the id belongs to another request: an audit event only
            self.ledger.record_rejection(rej.reason, msg.source, request_id=rej.request_id, model=rej.model)
        self._dead_letter(msg, rej.reason, rej.detail)
        key = rej.model or (msg.key[:256].decode("utf-8", "replace") if msg.key else None)
        self._result(key, request_id=rej.request_id, model=rej.model, status="rejected", method=asked,
                     reason=rej.reason, error=rej.detail, body_sha256=digest)
        # labels only from names the daemon knows: a requester's string would make a new series per value
        known = asked if asked in engine_names() else ""
        metrics.REQUESTS.labels(rej.model if rej.model in self.config.models else "", known, "rejected").inc()
        self.answered(msg)

    def _owned_by_another(self, request_id: str, body_sha256: str | None) -> bool:
        """Whether the ledger's row for this id is another message's to keep: one applied, failed or in flight
        with another body. A message that reuses its id (a mistake or an attack) is refused without touching it: a
        failed request stays failed (and retryable), an applied one applied, one in flight is not pre-empted."""
        seen = self.ledger.get_request(request_id)
        return seen is not None and seen.status != "rejected" and seen.body_sha256 != body_sha256

    def failed(self, a: Admitted, error: str) -> None:
        request, method, reason = a.request, a.method, DeadLetterReason.ENGINE_FAILED
        log.error("request %s failed: %s", request.request_id, error)
        self._record(request.request_id, "failed", model=request.model, method=method, subject=request.subject,
                     body_sha256=a.body_hash, reason=reason, error=error, source=a.msg.source)
        self._dead_letter(a.msg, reason, error)
        self._result(request.model, request_id=request.request_id, model=request.model, status="failed",
                     method=method, reason=reason, error=error, subject=request.subject, body_sha256=a.body_hash)
        metrics.REQUESTS.labels(request.model, method, "failed").inc()
        self.answered(a.msg)

    def duplicate(self, row: RequestRow, msg: Message) -> None:
        """A re-sent request, or a redelivery of one whose answer may not have gone out before a crash: repeat the
        recorded answer, change nothing. A redelivery of the very record also repeats what went with the answer:
        the artifact event of an applied request (if still active), the dead letter of a failed one."""
        artifact = self.ledger.get_artifact(row.model, row.artifact_id) if row.model and row.artifact_id else None
        unchanged = row.metrics.get("forgotten") == 0 and "already_forgotten" in row.metrics
        status, reason, error = row.status, row.reason, row.error
        if self.ledger.rolled_back(row):  # "applied" would tell the requester its data is forgotten: it is not now
            status, reason, error = "rolled_back", "rolled_back", _ROLLED_BACK.format(artifact=row.artifact_id,
                                                                                      model=row.model)
        self._result(row.model, request_id=row.request_id, model=row.model, status=status, method=row.method,
                     artifact_id=row.artifact_id, artifact_kind=artifact.kind if artifact else None,
                     measures=row.metrics, duration_s=row.duration_s, reason=reason, error=error,
                     subject=row.subject, changed=(not unchanged) if status == "applied" else None,
                     receipt=_receipt(artifact), body_sha256=row.body_sha256,
                     completed_at=datetime.fromtimestamp(row.completed_at or time.time(), UTC))
        if msg.source == row.source:
            if row.status == "failed":
                self._dead_letter(msg, DeadLetterReason.ENGINE_FAILED, row.error or "", count=False)
            elif artifact is not None and artifact.active and not unchanged:
                self._out.artifact_event(artifact.model, artifact.id, "published",
                                           {"kind": artifact.kind, "parent": artifact.parent,
                                            "request_id": artifact.request_id, "sha256": artifact.sha256,
                                            "path": artifact.path})
        metrics.REQUESTS.labels(row.model or "", row.method or "", "duplicate").inc()
        log.info("request %s already %s; answered from the ledger", row.request_id, status.replace("_", " "))
        self.answered(msg)

    def rekeyed(self, msg: Message, model: str, method: str, request_id: str) -> None:
        """An unkeyed (or wrongly keyed) request, re-published keyed by its model for the model's partition owner."""
        assert msg.raw is not None  # it decoded to a request, so it has a body
        self._out.rekey(msg.raw, msg.headers, model=model, source=msg.source)
        metrics.REQUESTS.labels(model, method, "rekeyed").inc()
        log.info("request %s re-published keyed by its model %s (it came keyed %s)", request_id, model,
                 "by something else" if msg.key else "by nothing")
        self.answered(msg)

    def announce_adapters(self) -> None:
        """On every (re)connect, say again on the adapters topic which adapters are active. The ledger is the
        truth and the topic only announces it: a broker that lost its data (the embedded one always does on a
        restart) would otherwise leave routers that start later with no adapters at all."""
        count = 0
        for name in self.config.models:
            for row in self.ledger.list_artifacts(name, "adapter"):
                self._out.artifact_event(name, row.id, "announced", {
                    "kind": "adapter", "active": row.active, "path": row.path, "sha256": row.sha256,
                    "request_id": row.request_id})
                count += 1
        if count:
            self._out.flush()
            log.info("announced the state of %d adapter(s) on %s", count, self.config.kafka.topics.adapters)

    def count_rollbacks(self) -> None:
        """unlearnd_rollbacks_total from the ledger's audit trail: the CLI rolls back and restores in its own
        process, so this daemon's metric (the one Prometheus scrapes) counts what the ledger recorded. The first
        call counts the whole history: the counter equals the ledger's totals, and a restart is a plain reset."""
        for event in self.ledger.events_after(self._rollback_seq, ("rolled_back", "restored")):
            metrics.ROLLBACKS.labels(event["model"], event["kind"]).inc()
            self._rollback_seq = event["seq"]
            self.update_model_gauges(event["model"])

    def update_model_gauges(self, model: str) -> None:
        metrics.MODEL_VERSIONS.labels(model).set(self.ledger.count_artifacts(model, "version"))
        metrics.ACTIVE_ADAPTERS.labels(model).set(self.ledger.count_artifacts(model, "adapter", active_only=True))

    # --- the one writer of each kind of record -----------------------------------------------------------------

    @property
    def _out(self) -> kafka_io.Outbox:
        if self.outbox is None:
            raise RuntimeError("no connection to the Kafka cluster: nothing can be answered")
        return self.outbox

    def _record(self, request_id: str, status: str, **row: Any) -> None:
        self.ledger.finish(request_id, status, **row)

    def _result(self, key: str | None, *, artifact_id: str | None = None, artifact_kind: str | None = None,
                completed_at: datetime | None = None, measures: dict[str, Any] | None = None, **fields: Any) -> None:
        self._out.result(Result(version=artifact_id if artifact_kind == "version" else None,
                                  adapter_id=artifact_id if artifact_kind == "adapter" else None,
                                  metrics=measures or {}, completed_at=completed_at or datetime.now(UTC),
                                  **fields), key)

    def _dead_letter(self, msg: Message, reason: DeadLetterReason, error: str, *, count: bool = True) -> None:
        """`count`: False when repeating a dead letter already counted (a redelivered record)."""
        self._out.dead_letter(msg.raw, msg.key, msg.headers, reason=reason, error=error, source=msg.source)
        if count:
            metrics.DLQ.labels(reason).inc()

    # --- which answered records are marked ---------------------------------------------------------------------

    def answered(self, msg: Message) -> None:
        if msg.offset >= 0:
            if not self._unmarked:
                self._unmarked_since = time.monotonic()
            self._unmarked.append(msg)

    @property
    def unmarked(self) -> bool:
        return bool(self._unmarked)

    def flush(self) -> None:
        """Flush the producer, then remember which records are answered (so a redelivery is not answered twice)."""
        self._out.flush()
        marks, self._unmarked = self._unmarked, []
        if marks:
            try:
                self.ledger.mark_answered([(m.topic, m.partition, m.offset, m.fingerprint) for m in marks])
            except Exception as exc:  # losing the marks costs at most one repeated answer after a crash
                log.debug("could not record answered records: %s", exc)

    def flush_before_engine(self, long: bool) -> None:
        """Before engine work that can take long (a suspect in its child process, an engine that reports progress),
        or when answers have waited a while, make the answers given so far durable and mark them, so that a kill
        meanwhile does not have them repeated on redelivery. Short engine steps share the flush at the commit."""
        if self._unmarked and (long or time.monotonic() - self._unmarked_since > UNMARKED_MAX_S):
            self.flush()


def _receipt(artifact: ArtifactRow | None) -> dict[str, Any] | None:
    """The receipt a repeated answer carries, as the ledger recorded it (an image erasure's: its id and hashes)."""
    if artifact is None or "receipt" not in artifact.info:
        return None
    return {artifact.kind: artifact.id, **artifact.info["receipt"]}

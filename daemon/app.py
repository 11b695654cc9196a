"""The daemon: one object owns the loop (poll, process, commit), its errors and its shutdown.

Per message, in the order of DESIGN.md's data flow::

    validate -> dedupe (ledger) -> apply (engine) -> persist (artifact, then ledger) -> announce -> commit

Offsets are committed only after the ledger rows are durable and the producer has flushed the result events:
at-least-once delivery, exactly-once effect. Every failure goes to `_reject` (bad input: dead-letter +
`rejected`) or `_fail` (engine failed `max_attempts` times: dead-letter + `failed`); the loop itself keeps
running. A lost broker is waited for with backoff and all clients are recreated when it comes back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from adapters.base import EngineError, Forget, InvalidForget
from adapters.store import ArtifactStore
from daemon import failpoints, kafka_io, metrics
from daemon.broker import EmbeddedBroker
from daemon.config import Config
from daemon.ledger import TERMINAL, Ledger, RequestRow
from daemon.models import ModelRegistry, UnknownModel
from daemon.schema import Rejected, Request, Result, decode

log = logging.getLogger("unlearnd")


class BrokerLost(Exception):
    pass


class StartupError(Exception):
    """The daemon cannot start (a port taken, a model that cannot be built): one line for the operator."""


class StopDuringStartup(BaseException):
    """Raised by the signal handler to abandon start-up (a first-start bootstrap trains for minutes). A
    BaseException, so no `except Exception` on the way swallows it; not KeyboardInterrupt itself, because CPython
    3.11 can remember a KeyboardInterrupt raised inside C-evaluated code (an import, say) and end the process by
    SIGINT at exit even after it was caught."""


@dataclass
class Message:
    """One polled record and where it came from (for the DLQ and the audit trail)."""

    raw: bytes | None
    key: bytes | None
    headers: list
    source: str
    polled_at: float = field(default_factory=time.perf_counter)


@dataclass
class Admitted:
    """A message that passed validation and dedupe: a new request to apply."""

    msg: Message
    request: Request
    method: str
    body_hash: str

    @property
    def forget(self) -> Forget:
        return self.request.forget.to_forget()


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.store = ArtifactStore(config.state.artifacts_path)
        self.ledger = Ledger(config.state.ledger_path, config.state.ledger_synchronous)
        self.registry = ModelRegistry(config, self.store, self.ledger)
        self.broker: EmbeddedBroker | None = None
        self.bootstrap_servers = config.kafka.bootstrap_servers
        self._stop = threading.Event()
        self._starting = False  # during start(): a stop signal interrupts at once (bootstrap can take minutes)
        self._rollback_seq = 0  # last audit event counted into unlearnd_rollbacks_total
        self._consumer = None
        self._outbox: kafka_io.Outbox | None = None
        key_env = config.requests.hmac_key_env
        self._hmac_key = os.environ[key_env].encode() if os.environ.get(key_env) else None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, *, progress: bool = True) -> None:
        """Everything before the loop: metrics endpoint (so probes see `unlearnd_bootstrapping`), broker (if
        embedded), state, models. Raises StartupError for what an operator must fix."""
        self.registry.check_methods()
        if self.config.metrics.enabled:
            host, port = self.config.metrics.host, self.config.metrics.port
            try:
                port = metrics.serve(host, port)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {host}:{port} ({exc.strerror}): is another unlearnd "
                                   "running? Stop it or set metrics.port") from None
            log.info("metrics on http://%s:%d/metrics", host, port)
        metrics.BOOTSTRAPPING.set(1)
        if self.config.kafka.bootstrap_servers == "embedded":
            try:
                self.broker = EmbeddedBroker(self.config.kafka.embedded_port).start()
            except RuntimeError as exc:
                raise StartupError(f"embedded broker: {exc}") from None
            self.bootstrap_servers = self.broker.bootstrap_servers
        cleaned = self.store.clean_staging()
        if cleaned:
            log.info("removed %d unfinished artifact write(s) left by a crash", cleaned)
        for name in self.config.models:
            head = self.registry.ensure_bootstrapped(name, progress=progress)
            self._update_model_gauges(name)
            log.info("model %s ready at %s", name, head.id if head else "its base weights")
        self._count_rollbacks()
        metrics.BOOTSTRAPPING.set(0)

    def _update_model_gauges(self, model: str) -> None:
        metrics.MODEL_VERSIONS.labels(model).set(self.ledger.count_artifacts(model, "version"))
        metrics.ACTIVE_ADAPTERS.labels(model).set(self.ledger.count_artifacts(model, "adapter", active_only=True))

    def stop(self, *_args) -> None:
        """Signal-safe: finish the message in hand, commit, close. During start-up, stop at once: a first-start
        bootstrap trains for minutes, and what it writes is atomic (staging + rename, one ledger transaction),
        so an interrupted one leaves nothing half-written and the next start begins it again."""
        if self._starting:
            self._starting = False  # raise once; cleanup code that runs next must not be interrupted again
            self._stop.set()
            raise StopDuringStartup
        if not self._stop.is_set():
            log.info("stopping: finishing the request in hand, then committing")
        self._stop.set()

    def run(self) -> int:
        """Start and serve until stopped; the signal handlers are in place before start-up, bootstrap included."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        try:
            self._starting = True
            try:
                self.start()
            except StopDuringStartup:
                log.info("stopped during start-up; nothing half-written is kept, the next start resumes")
                return 0
            finally:
                self._starting = False
            self.loop()
        finally:
            self.close()
        return 0

    def loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._connect()
                backoff = 0.5
                self._consume()
            except (BrokerLost, KafkaError, OSError) as exc:
                if self._stop.is_set():
                    break
                metrics.BROKER_CONNECTED.set(0)
                metrics.BROKER_DISCONNECTS.inc()
                log.warning("broker unavailable (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                self._close_clients()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.kafka.reconnect_backoff_max_s)

    def close(self) -> None:
        self._close_clients()
        self.ledger.close()
        if self.broker:
            self.broker.stop()
        log.info("stopped")

    # --- connection -----------------------------------------------------------------------------------------

    def _connect(self) -> None:
        if self._consumer is not None:
            return
        if not self._reachable():
            raise BrokerLost(f"cannot reach {self.bootstrap_servers}")
        cfg = self.config.kafka
        if cfg.create_topics:
            kafka_io.ensure_topics(cfg, self.bootstrap_servers)
        # A fresh producer each time: an idempotent producer is fenced once a broker has lost its state.
        self._outbox = kafka_io.Outbox(kafka_io.make_producer(cfg, self.bootstrap_servers), cfg)
        self._announce_adapters()
        self._consumer = kafka_io.make_consumer(cfg, self.bootstrap_servers, cfg.topics.requests)
        metrics.BROKER_CONNECTED.set(1)
        log.info("connected to %s, consuming %s as group %s", self.bootstrap_servers, cfg.topics.requests,
                 cfg.group_id)

    def _announce_adapters(self) -> None:
        """On every (re)connect, say again on the adapters topic which adapters are active. The ledger is the
        truth and the topic only announces it: a broker that lost its data (the embedded one always does on a
        restart) would otherwise leave routers that start later with no adapters at all."""
        count = 0
        for name in self.config.models:
            for row in self.ledger.list_artifacts(name, "adapter"):
                self._outbox.artifact_event(name, row.id, "announced", {
                    "kind": "adapter", "active": row.active, "path": row.path, "sha256": row.sha256,
                    "request_id": row.request_id})
                count += 1
        if count:
            self._outbox.flush()
            log.info("announced the state of %d adapter(s) on %s", count, self.config.kafka.topics.adapters)

    def _reachable(self) -> bool:
        return kafka_io.reachable(self.bootstrap_servers)

    def _close_clients(self) -> None:
        for closer in (lambda: self._consumer and self._consumer.close(autocommit=False),
                       lambda: self._outbox and self._outbox.producer.close(timeout=2)):
            try:
                closer()
            except Exception as exc:  # closing a client of a dead broker may fail; nothing is lost by it
                log.debug("error while closing a Kafka client: %s", exc)
        self._consumer, self._outbox = None, None

    # --- the loop -------------------------------------------------------------------------------------------

    def _consume(self) -> None:
        last_check = time.monotonic()
        while not self._stop.is_set():
            batch = self._consumer.poll(timeout_ms=self.config.kafka.poll_timeout_ms)
            done: dict[TopicPartition, int] = {}
            for tp, records in batch.items():
                if self._stop.is_set():
                    break  # not committed: redelivered to whoever owns the partition next
                metrics.IN_FLIGHT.set(len(records))
                msgs = [Message(r.value, r.key, list(r.headers or []), f"{r.topic}/{r.partition}/{r.offset}")
                        for r in records]
                handled = self.handle_partition_batch(msgs)
                if handled:
                    done[tp] = records[handled - 1].offset + 1
            metrics.IN_FLIGHT.set(0)
            if done:
                self._outbox.flush()
                failpoints.hit("before_offset_commit")
                self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in done.items()})
            self._report_lag()
            if time.monotonic() - last_check > 2.0:
                last_check = time.monotonic()
                self._count_rollbacks()
                if not self._reachable():
                    raise BrokerLost(f"lost {self.bootstrap_servers}")

    def _count_rollbacks(self) -> None:
        """unlearnd_rollbacks_total from the ledger's audit trail: the CLI rolls back and restores in its own
        process, so this daemon's metric (the one Prometheus scrapes) counts what the ledger recorded. The first
        call counts the whole history: the counter equals the ledger's totals, and a restart is a plain reset."""
        for event in self.ledger.events_after(self._rollback_seq, ("rolled_back", "restored")):
            metrics.ROLLBACKS.labels(event["model"], event["kind"]).inc()
            self._rollback_seq = event["seq"]
            self._update_model_gauges(event["model"])

    def _report_lag(self) -> None:
        for tp, lag in kafka_io.lag_by_partition(self._consumer).items():
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)

    def handle_partition_batch(self, msgs: list[Message]) -> int:
        """Messages of one partition, in order; returns how many were handled (all, unless stopping).

        Consecutive new requests for the same model and method, when the engine's deltas add up (IAU), are
        coalesced: one engine step, one version, one ledger transaction, and still one result per request.
        """
        group: list[Admitted] = []
        handled = 0
        for msg in msgs:
            if self._stop.is_set():
                break
            admitted = self._admit(msg)
            if admitted is not None and any(g.request.request_id == admitted.request.request_id for g in group):
                self._apply_group(group)  # the same id twice in one poll: the second is a duplicate
                group = []
                admitted = self._admit(msg)
            handled += 1
            if admitted is None:
                continue
            if not self._coalescable(admitted):
                self._apply_group(group)
                group = []
                self._apply(admitted)
            elif group and (group[0].request.model, group[0].method) != (admitted.request.model, admitted.method):
                self._apply_group(group)
                group = [admitted]
            else:
                group.append(admitted)
        self._apply_group(group)
        return handled

    def _admit(self, msg: Message) -> "Admitted | None":
        """validate -> dedupe. Returns a request to apply, or None when the message was answered already."""
        try:
            request, body_hash = decode(msg.raw, max_bytes=self.config.requests.max_bytes, hmac_key=self._hmac_key)
            method = self._validate_target(request)
        except Rejected as rej:
            self._reject(msg, rej)
            return None
        seen = self.ledger.get_request(request.request_id)
        if seen is not None and seen.status in TERMINAL:
            if seen.body_sha256 == body_hash:
                self._answer_duplicate(seen)
                return None
            if seen.status != "rejected":  # a rejected id may be resubmitted corrected; an applied one may not
                self._reject(msg, Rejected("request_id_conflict", f"request_id already {seen.status} with a "
                                           "different body", request.request_id, request.model), record=False)
                return None
        return Admitted(msg, request, method, body_hash)

    def _coalescable(self, a: "Admitted") -> bool:
        return (self.config.requests.coalesce and self.registry.engine(a.method).coalescable
                and a.request.forget.sample_ids is not None)

    def _validate_target(self, request: Request) -> str:
        try:
            spec = self.registry.spec(request.model)
        except UnknownModel as exc:
            raise Rejected("unknown_model", str(exc), request.request_id, request.model) from None
        method = self.registry.method_for(request.model, request.method, request.forget.to_forget().kind)
        try:
            engine = self.registry.engine(method)
        except KeyError as exc:
            raise Rejected("unknown_method", str(exc.args[0]), request.request_id, request.model) from None
        if spec.kind not in engine.model_kinds:
            raise Rejected("unknown_method", f"method {method!r} does not apply to {spec.kind} models",
                           request.request_id, request.model)
        if request.forget.size() > self.config.requests.max_forget_items:
            raise Rejected("schema", f"forget names {request.forget.size()} items > requests.max_forget_items",
                           request.request_id, request.model)
        return method

    def _begin_attempt(self, a: "Admitted") -> int:
        return self.ledger.begin_attempt(
            a.request.request_id, model=a.request.model, method=a.method, subject=a.request.subject,
            body_sha256=a.body_hash, forget_kind=a.forget.kind, forget_count=a.request.forget.size(),
            source=a.msg.source)

    def _finish_applied(self, a: "Admitted", artifact_id: str, change, duration: float) -> None:
        self.ledger.finish(a.request.request_id, "applied", model=a.request.model, method=a.method,
                           subject=a.request.subject, body_sha256=a.body_hash, artifact_id=artifact_id,
                           metrics=change.metrics, duration_s=duration, source=a.msg.source)

    def _apply(self, a: "Admitted", attempt: int | None = None) -> None:
        """apply -> persist -> announce for one request, with bounded retries."""
        cfg = self.config.requests
        request, method = a.request, a.method
        attempt = attempt or self._begin_attempt(a)
        log.info("request %s: %s on %s, forget %d %s (attempt %d)", request.request_id, method, request.model,
                 request.forget.size(), a.forget.kind, attempt)
        while True:
            if attempt > cfg.max_attempts:  # e.g. the daemon died in this request again and again
                self._fail(a, f"gave up after {cfg.max_attempts} attempts")
                return
            try:
                failpoints.hit("before_engine")
                target = self.registry.target(request.model)
                engine = self.registry.engine(method)
                if engine.reports_progress:
                    self._progress(a, {"stage": "started", "attempt": attempt})
                    change = engine.apply(target, a.forget, progress=lambda info: self._progress(a, info))
                else:
                    change = engine.apply(target, a.forget)
                duration = time.perf_counter() - a.msg.polled_at
                committed = self.registry.commit(
                    request.model, change, target=target, request_ids=[request.request_id],
                    finish=lambda artifact_id: self._finish_applied(a, artifact_id, change, duration))
                failpoints.hit("after_ledger")
                break
            except InvalidForget as exc:
                self._reject(a.msg, Rejected("invalid_forget", str(exc), request.request_id, request.model),
                             method=method, body_hash=a.body_hash)
                return
            except Exception as exc:
                if isinstance(exc, EngineError) and not exc.retryable or attempt >= cfg.max_attempts:
                    self._fail(a, f"{type(exc).__name__}: {exc}")
                    return
                metrics.ENGINE_RETRIES.labels(request.model, method).inc()
                delay = cfg.retry_backoff_s * 2 ** (attempt - 1)
                log.warning("request %s attempt %d failed (%s); retrying in %.1fs", request.request_id, attempt,
                            type(exc).__name__, delay)
                if self._stop.wait(delay):
                    raise BrokerLost("stopping during a retry") from None  # uncommitted: redelivered later
                attempt = self._begin_attempt(a)
        self._announce_applied([a], committed, change, target, {request.request_id: duration})

    def _progress(self, a: "Admitted", info: dict) -> None:
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
                self._outbox.progress(rid, a.request.model, a.method, info)
                self._outbox.producer.flush(5)  # a waiting client should see it now, not with the result
            except Exception as exc:  # progress is best effort: it must never fail the request it reports on
                log.debug("progress event of %s not sent: %s", rid, exc)

    def _apply_group(self, group: list["Admitted"]) -> None:
        """Coalesced apply of same-model requests; anything unusual falls back to one at a time."""
        if len(group) <= 1:
            for a in group:
                self._apply(a)
            return
        if any((row := self.ledger.get_request(a.request.request_id)) and row.status == "processing" for a in group):
            for a in group:  # an earlier try of this group crashed: isolate the request that did it
                self._apply(a)
            return
        model, method = group[0].request.model, group[0].method
        with self.ledger.transaction():
            attempts = [self._begin_attempt(a) for a in group]
        try:
            failpoints.hit("before_engine")
            target = self.registry.target(model)
            engine = self.registry.engine(method)
            valid = []
            for a, attempt in zip(group, attempts):  # a request that cannot apply is rejected alone
                try:
                    engine.validate(target, a.forget)
                    valid.append((a, attempt))
                except InvalidForget as exc:
                    self._reject(a.msg, Rejected("invalid_forget", str(exc), a.request.request_id, model),
                                 method=method, body_hash=a.body_hash)
            if len(valid) <= 1:
                for a, attempt in valid:
                    self._apply(a, attempt)
                return
            group, attempts = [a for a, _ in valid], [at for _, at in valid]
            merged = group[0].forget
            for a in group[1:]:
                merged = merged.merged(a.forget)
            change = engine.apply(target, merged)
            change.metrics["coalesced_requests"] = float(len(group))
            durations = {a.request.request_id: time.perf_counter() - a.msg.polled_at for a in group}

            def finish(artifact_id: str) -> None:
                for a in group:
                    self._finish_applied(a, artifact_id, change, durations[a.request.request_id])

            committed = self.registry.commit(model, change, target=target,
                                             request_ids=[a.request.request_id for a in group], finish=finish)
            failpoints.hit("after_ledger")
        except Exception as exc:  # e.g. one request names an unknown sample: let each succeed or fail alone
            log.info("coalesced apply of %d requests failed (%s); applying one at a time", len(group),
                     type(exc).__name__)
            for a, attempt in zip(group, attempts):
                self._apply(a, attempt)
            return
        log.info("coalesced %d requests on %s into %s", len(group), model, committed.artifact_id)
        self._announce_applied(group, committed, change, target, durations)

    def _announce_applied(self, group: list["Admitted"], committed, change, target, durations: dict) -> None:
        """One result per request, one artifact event, and the metrics."""
        is_version = committed.kind == "version"
        for a in group:
            rid = a.request.request_id
            self._outbox.result(Result(request_id=rid, model=a.request.model, status="applied", method=a.method,
                                       version=committed.artifact_id if is_version else None,
                                       adapter_id=None if is_version else committed.artifact_id,
                                       metrics=change.metrics, duration_s=durations[rid], subject=a.request.subject,
                                       completed_at=_now()), a.request.model)
            metrics.REQUESTS.labels(a.request.model, a.method, "applied").inc()
            metrics.REQUEST_SECONDS.labels(a.request.model, a.method).observe(durations[rid])
            log.info("request %s applied: %s %s in %.3fs", rid, committed.kind, committed.artifact_id, durations[rid])
        model = group[0].request.model
        self._outbox.artifact_event(model, committed.artifact_id, "published",
                                    {"kind": committed.kind, "parent": target.version if is_version else None,
                                     "request_id": group[0].request.request_id,
                                     "request_ids": [a.request.request_id for a in group],
                                     "sha256": committed.sha256, "path": str(committed.path)})
        metrics.LAST_APPLIED.labels(model).set(time.time())
        self._update_model_gauges(model)

    # --- outcomes other than applied -----------------------------------------------------------------------

    def _reject(self, msg: Message, rej: Rejected, *, method: str | None = None, body_hash: str | None = None,
                record: bool = True) -> None:
        log.warning("rejected message %s: %s (request_id=%s)", msg.source, rej.reason, rej.request_id)
        self._outbox.dead_letter(msg.raw, msg.key, msg.headers, reason=rej.reason, error=rej.detail, source=msg.source)
        if record and rej.request_id:
            self.ledger.finish(rej.request_id, "rejected", model=rej.model, method=method, body_sha256=body_hash,
                               reason=rej.reason, error=rej.detail, source=msg.source)
        else:  # no id to file it under, or the id belongs to another request: an audit event only
            self.ledger.record_rejection(rej.reason, msg.source, request_id=rej.request_id, model=rej.model)
        self._outbox.result(Result(request_id=rej.request_id, model=rej.model, status="rejected", method=method,
                                   reason=rej.reason, error=rej.detail, completed_at=_now()),
                            rej.model or (msg.key.decode("utf-8", "replace") if msg.key else None))
        metrics.DLQ.labels(rej.reason).inc()
        metrics.REQUESTS.labels(rej.model if rej.model in self.config.models else "", method or "", "rejected").inc()

    def _fail(self, a: "Admitted", error: str) -> None:
        request, method = a.request, a.method
        log.error("request %s failed: %s", request.request_id, error)
        self._outbox.dead_letter(a.msg.raw, a.msg.key, a.msg.headers, reason="engine_failed", error=error,
                                 source=a.msg.source)
        self.ledger.finish(request.request_id, "failed", model=request.model, method=method, subject=request.subject,
                           body_sha256=a.body_hash, reason="engine_failed", error=error, source=a.msg.source)
        self._outbox.result(Result(request_id=request.request_id, model=request.model, status="failed", method=method,
                                   reason="engine_failed", error=error, subject=request.subject, completed_at=_now()),
                            request.model)
        metrics.DLQ.labels("engine_failed").inc()
        metrics.REQUESTS.labels(request.model, method, "failed").inc()

    def _answer_duplicate(self, row: RequestRow) -> None:
        """A redelivered or re-sent request: repeat the recorded answer, change nothing."""
        kind = self.ledger.get_artifact(row.model, row.artifact_id).kind if row.artifact_id else None
        self._outbox.result(Result(request_id=row.request_id, model=row.model, status=row.status, method=row.method,
                                   version=row.artifact_id if kind == "version" else None,
                                   adapter_id=row.artifact_id if kind == "adapter" else None, metrics=row.metrics,
                                   duration_s=row.duration_s, reason=row.reason, error=row.error, subject=row.subject,
                                   completed_at=datetime.fromtimestamp(row.completed_at or time.time(), timezone.utc)),
                            row.model)
        metrics.REQUESTS.labels(row.model or "", row.method or "", "duplicate").inc()
        log.info("request %s already %s; answered from the ledger", row.request_id, row.status)


def _now() -> datetime:
    return datetime.now(timezone.utc)

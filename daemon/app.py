"""The daemon: one object owns the loop (poll, process, commit), its errors and its shutdown.

Per message, in the order of DESIGN.md's data flow::

    validate -> dedupe (ledger) -> apply (engine) -> persist (artifact, then ledger) -> announce -> commit

Offsets are committed only after the ledger rows are durable and the producer has flushed the result events:
at-least-once delivery, exactly-once effect. How each kind of trouble is met:

- bad input (any content, header or size): `_reject`, a dead letter with its reason, never a crash;
- a request the engine fails on (raises, or its isolated process dies) `max_attempts` times: `_fail`;
- a kill of the daemon: nothing is counted; a request that was in hand is a *suspect* and is applied next in a
  child process (daemon/isolation.py), which tells a request that kills the engine from a deploy that killed us;
- a full disk or a busy ledger (daemon/transient.py): the pipeline pauses and retries the message with backoff;
- a lost, frozen or wiped broker (daemon/liveness.py): all clients are recreated when it answers again;
- a record kafka-python cannot decode (daemon/record_decoding.py): dead-lettered as `undecodable_record` with
  what can be recovered of it and its offset; its partition moves on.

The engine runs in a worker thread while the main thread keeps polling with the partitions paused, so that long
engine work never gets the consumer evicted from its group.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import MemberState, OffsetAndMetadata

from adapters.base import EngineError, Forget, InvalidForget, NothingToForget
from adapters.store import ArtifactStore
from daemon import failpoints, isolation, kafka_io, liveness, metrics, record_decoding, transient
from daemon.broker import EmbeddedBroker
from daemon.config import Config
from daemon.dead_letter import record_size
from daemon.engine_configs import check_engines
from daemon.ledger import Ledger, RequestRow
from daemon.models import ModelRegistry, UnknownModel
from daemon.schema import MAX_DETAIL_CHARS, Rejected, Request, Result, decode
from daemon.state_lock import StateLock
from daemon.transient import Transient

log = logging.getLogger("unlearnd")

KEEPALIVE_S = 1.0  # while the engine works, the main thread polls (partitions paused) this often
UNMARKED_MAX_S = 0.5  # answers older than this are flushed and marked before the next engine step
BOOTSTRAP_RETRY_S = 30.0  # first delay before a failed background bootstrap is tried again; doubles


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
    """One polled record and where it came from (for the DLQ, the audit trail and redelivery checks)."""

    raw: bytes | None
    key: bytes | None
    headers: list
    source: str
    polled_at: float = field(default_factory=time.perf_counter)
    topic: str = ""
    partition: int = -1
    offset: int = -1
    timestamp: int = -1

    @classmethod
    def of(cls, r) -> "Message":
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


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self._state_lock = StateLock(config.state.ledger_path).acquire()  # first: nothing is touched before it
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
        self._watch: liveness.BrokerWatch | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unlearnd-engine")
        self._unmarked: list[Message] = []  # answered, answers not yet flushed and marked in the ledger
        self._unmarked_since = 0.0
        self._not_suspect: set[str] = set()  # ids this process interrupted cleanly (a pause, a stop): no crash
        self._transient: Transient | None = None
        self._paused_by: str | None = None
        self._marks: dict[int, str] = {}  # offset -> fingerprint of the batch's records answered before a crash
        self._transient_backoff = config.requests.retry_backoff_s
        self._bootstrapper: threading.Thread | None = None  # builds models whose bootstrap runs in the background
        key_env = config.requests.hmac_key_env
        self._hmac_key = os.environ[key_env].encode() if os.environ.get(key_env) else None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, *, progress: bool = True) -> None:
        """Everything before the loop: metrics endpoint (so probes see `unlearnd_bootstrapping`), broker (if
        embedded), state, models. Raises StartupError or ConfigError for what an operator must fix."""
        check_engines(self.config, self.registry)
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
        later = []
        for name in self.config.models:
            if self.registry.bootstraps_later(name):
                later.append(name)
                continue
            head = self.registry.ensure_bootstrapped(name, progress=progress)
            self._update_model_gauges(name)
            log.info("model %s ready at %s", name, head.id if head else "its base weights")
        self._count_rollbacks()
        metrics.BOOTSTRAPPING.set(0)
        if later:
            log.info("model(s) %s have no version yet: built in the background while the daemon consumes; their "
                     "requests wait until they are ready", ", ".join(later))
            self._bootstrapper = threading.Thread(target=self._bootstrap_in_background, args=(later,),
                                                  name="unlearnd-bootstrap", daemon=True)
            self._bootstrapper.start()

    def _bootstrap_in_background(self, names: list[str]) -> None:
        """Build models' first versions off the consuming path (progress in the log). A failure is logged and
        tried again with backoff; a stop ends it at once (nothing half-written: the next start begins again)."""
        from adapters.diffusion.training import TrainingStopped

        for name in names:
            delay = BOOTSTRAP_RETRY_S
            while not self._stop.is_set():
                try:
                    head = self.registry.ensure_bootstrapped(name, progress=False, stop=self._stop)
                except TrainingStopped:
                    log.info("bootstrap of %s stopped; the next start begins it again", name)
                    return
                except Exception:
                    log.exception("bootstrap of %s failed; trying again in %.0fs", name, delay)
                    self._stop.wait(delay)
                    delay = min(2 * delay, 600.0)
                    continue
                self._update_model_gauges(name)
                log.info("model %s ready at %s", name, head.id)
                break

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
                self._close_clients(graceful=False)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.kafka.reconnect_backoff_max_s)

    def close(self) -> None:
        self._close_clients(graceful=True)
        self._worker.shutdown(wait=True)
        if self._bootstrapper is not None:
            self._stop.set()
            self._bootstrapper.join()  # stops within one training step
        self.ledger.close()
        if self.broker:
            self.broker.stop()
        self._state_lock.release()
        log.info("stopped")

    # --- connection -----------------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Ask the cluster a real question, (re-)create the topics, then the clients, then watch the cluster."""
        if self._consumer is not None:
            return
        cfg = self.config.kafka
        admin = liveness.admin_client(cfg, self.bootstrap_servers, cfg.liveness_timeout_s)
        try:
            cluster = liveness.cluster_id(admin)
            if cfg.create_topics:
                kafka_io.ensure_topics(cfg, self.bootstrap_servers, self.config.requests.max_bytes, admin=admin)
        finally:
            admin.close()
        record_decoding.install()
        # A fresh producer each time: an idempotent producer is fenced once a broker has lost its state.
        max_bytes = self.config.requests.max_bytes
        self._outbox = kafka_io.Outbox(kafka_io.make_producer(cfg, self.bootstrap_servers, max_bytes), cfg, max_bytes)
        self._announce_adapters()
        self._consumer = kafka_io.make_consumer(cfg, self.bootstrap_servers, cfg.topics.requests)
        self._watch = liveness.BrokerWatch(cfg, self.bootstrap_servers, cluster)
        self._watch.start()
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

    def _close_clients(self, *, graceful: bool) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        consumer, outbox = self._consumer, self._outbox
        self._consumer, self._outbox = None, None
        try:
            if consumer is not None:
                if graceful:
                    self._settle_group(consumer)
                kafka_io.close_consumer(consumer, timeout_ms=5000 if graceful else 1000)
        except Exception as exc:  # closing a client of a dead broker may fail; nothing is lost by it
            log.debug("error while closing the consumer: %s", exc)
        try:
            if outbox is not None:
                outbox.producer.close(timeout=2)
        except Exception as exc:
            log.debug("error while closing the producer: %s", exc)

    def _settle_group(self, consumer) -> None:
        """Before leaving the group, let a join in flight complete, so the stop is a clean leave (the next daemon
        gets the partitions at once) rather than an expiry after session_timeout_ms (kafka_io.close_consumer)."""
        deadline = time.monotonic() + self.config.kafka.session_timeout_ms / 1000 + 5
        try:
            while consumer.group_metadata().state == MemberState.REBALANCING and time.monotonic() < deadline:
                consumer.pause(*consumer.assignment())
                consumer.poll(timeout_ms=200)  # nothing is handled: offsets are not committed, records come again
        except KafkaError as exc:
            log.debug("group did not settle before close: %s", exc)

    def _check_broker(self) -> None:
        if self._watch is not None and self._watch.lost.is_set():
            raise BrokerLost(self._watch.reason)

    # --- the loop -------------------------------------------------------------------------------------------

    def _consume(self) -> None:
        last_check = time.monotonic()
        while not self._stop.is_set():
            self._check_broker()
            batch = self._consumer.poll(timeout_ms=self.config.kafka.poll_timeout_ms)
            done: dict[TopicPartition, int] = {}
            for tp, records in batch.items():
                if self._stop.is_set() or self._transient is not None:
                    self._consumer.seek(tp, records[0].offset)  # not handled: polled again, or by the next owner
                    continue
                metrics.IN_FLIGHT.set(len(records))
                handled = self._while_polling(self.handle_partition_batch, [Message.of(r) for r in records])
                if handled:
                    done[tp] = records[handled - 1].offset + 1
                if handled < len(records):
                    self._consumer.seek(tp, records[handled].offset)
            metrics.IN_FLIGHT.set(0)
            self._commit(done)
            self._report_lag()
            if time.monotonic() - last_check > 2.0:
                last_check = time.monotonic()
                self._count_rollbacks()
            if self._transient is not None:
                self._pause_for(self._transient)
                self._transient = None
            elif self._paused_by is not None:  # the condition cleared: the retried messages went through
                log.info("resumed: %s cleared", self._paused_by)
                metrics.PAUSED.labels(self._paused_by).set(0)
                self._paused_by = None
                self._transient_backoff = self.config.requests.retry_backoff_s

    def _commit(self, done: dict[TopicPartition, int]) -> None:
        if not done and not self._unmarked:
            return
        self._flush_answers()
        if not done:
            return
        failpoints.hit("before_offset_commit")
        self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in done.items()}, timeout_ms=30_000)
        try:
            self.ledger.forget_answered({(tp.topic, tp.partition): off for tp, off in done.items()})
        except Exception as exc:  # the marks only save a repeated answer; a full disk must not stop the loop
            log.debug("could not prune answered marks: %s", exc)

    def _flush_answers(self) -> None:
        """Flush the producer, then remember which records are answered (so a redelivery is not answered twice)."""
        self._outbox.flush()
        marks, self._unmarked = self._unmarked, []
        if marks:
            try:
                self.ledger.mark_answered([(m.topic, m.partition, m.offset, m.fingerprint) for m in marks])
            except Exception as exc:  # losing the marks costs at most one repeated answer after a crash
                log.debug("could not record answered records: %s", exc)

    def _flush_answers_before_engine(self, long: bool) -> None:
        """Before engine work that can take long (a suspect in its child process, an engine that reports progress),
        or when answers have waited a while, make the answers given so far durable and mark them, so that a kill
        meanwhile does not have them repeated on redelivery. Short engine steps share the flush at the commit."""
        if self._unmarked and (long or time.monotonic() - self._unmarked_since > UNMARKED_MAX_S):
            self._flush_answers()

    def _answered(self, msg: Message) -> None:
        if msg.offset >= 0:
            if not self._unmarked:
                self._unmarked_since = time.monotonic()
            self._unmarked.append(msg)

    def _while_polling(self, fn, *args):
        """Run `fn` in the worker thread. Meanwhile keep polling with every partition paused: the consumer stays
        in its group however long the engine takes, and heartbeats and rebalances are served."""
        future = self._worker.submit(fn, *args)
        paused = []
        try:
            while True:
                try:
                    return future.result(timeout=KEEPALIVE_S)
                except concurrent.futures.TimeoutError:
                    pass
                consumer = self._consumer
                if consumer is None:
                    continue
                try:
                    paused = list(consumer.assignment())
                    consumer.pause(*paused)
                    for tp, records in consumer.poll(timeout_ms=100).items():
                        consumer.seek(tp, records[0].offset)  # a partition assigned meanwhile: not ours to skip
                except KafkaError as exc:  # the worker's outcome decides; a lost broker shows in the watch
                    log.debug("keep-alive poll failed: %s", exc)
        finally:
            if paused and self._consumer is not None:
                self._consumer.resume(*paused)

    def _pause_for(self, exc: Transient) -> None:
        """A transient condition: keep the consumer alive, wait with backoff, then retry the same message. The
        paused gauge stays up until a retry goes through."""
        if self._paused_by is not None and self._paused_by != exc.kind:
            metrics.PAUSED.labels(self._paused_by).set(0)
        self._paused_by = exc.kind
        metrics.PAUSED.labels(exc.kind).set(1)
        metrics.TRANSIENT_ERRORS.labels(exc.kind).inc()
        delay = self._transient_backoff
        log.warning("paused: %s; retrying in %.1fs (no request is failed for this)", exc, delay)
        deadline = time.monotonic() + delay
        assigned = list(self._consumer.assignment())
        self._consumer.pause(*assigned)
        try:
            while time.monotonic() < deadline and not self._stop.is_set():
                self._check_broker()
                for tp, records in self._consumer.poll(timeout_ms=200).items():
                    self._consumer.seek(tp, records[0].offset)
        finally:
            self._consumer.resume(*assigned)
        self._transient_backoff = min(delay * 2 or 0.1, self.config.requests.transient_backoff_max_s)

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
        """Messages of one partition, in order; returns how many were handled: all, unless stopping or a
        transient condition (then `self._transient` is set and the rest is polled again after a pause).

        Consecutive new requests for the same model and method, when the engine's deltas add up (IAU), are
        coalesced: one engine step, one version, one ledger transaction, and still one result per request.
        """
        group: list[Admitted] = []
        i = 0
        try:
            first = msgs[0] if msgs else None
            self._marks = self.ledger.answered_between(first.topic, first.partition, first.offset,
                                                       msgs[-1].offset) if first and first.offset >= 0 else {}
            for i, msg in enumerate(msgs):
                if self._stop.is_set():
                    self._apply_group(group)
                    return i
                admitted = self._admit(msg, i)
                if admitted is not None and any(g.request.request_id == admitted.request.request_id for g in group):
                    self._apply_group(group)  # the same id twice in one poll: the second is a duplicate
                    group = []
                    admitted = self._admit(msg, i)
                if admitted is None:
                    continue
                if not self._coalescable(admitted):
                    self._apply_group(group)
                    group = []
                    self._apply(admitted)
                elif group and (group[0].request.model, group[0].method) != (admitted.request.model,
                                                                             admitted.method):
                    self._apply_group(group)
                    group = [admitted]
                else:
                    group.append(admitted)
            i = len(msgs)
            self._apply_group(group)
            return len(msgs)
        except Exception as exc:
            kind = transient.kind_of(exc)
            if kind is None:
                raise
            self._transient = transient.as_transient(exc, kind)
            self._not_suspect.update(g.request.request_id for g in group)
            return min([g.index for g in group] + [i])

    def _admit(self, msg: Message, index: int = 0) -> "Admitted | None":
        """validate -> re-key -> dedupe. Returns a request to apply, or None when the message was answered."""
        if msg.offset in self._marks and self._marks[msg.offset] == msg.fingerprint:
            metrics.REDELIVERED.inc()  # answered and flushed before a crash: answering again would repeat it
            return None
        try:
            request, body_hash = self._decode(msg)
            method = self._validate_target(request)
        except Rejected as rej:
            self._reject(msg, rej)
            return None
        if self.config.requests.rekey_unkeyed and msg.key != request.model.encode():
            self._outbox.rekey(msg.raw, msg.headers, model=request.model, source=msg.source)
            metrics.REQUESTS.labels(request.model, method, "rekeyed").inc()
            log.info("request %s re-published keyed by its model %s (it came keyed %s)", request.request_id,
                     request.model, "by something else" if msg.key else "by nothing")
            self._answered(msg)
            return None
        seen = self.ledger.get_request(request.request_id)
        if seen is not None and seen.status in ("applied", "failed"):
            if seen.body_sha256 == body_hash:
                self._answer_duplicate(seen, msg)
            else:  # a rejected, re-admitted or unfinished id may come back corrected; a finished one may not
                self._reject(msg, Rejected("request_id_conflict", f"request_id already {seen.status} with a "
                                           "different body", request.request_id, request.model), record=False)
            return None
        # A rejected request sent again is judged afresh (its cause may be fixed: a model added, a key set).
        suspect = (seen is not None and seen.status == "processing" and request.request_id not in self._not_suspect)
        if suspect and not self.config.requests.isolate_suspects:
            # Without a child process the daemon cannot tell who killed it; the request in hand takes the blame.
            self.ledger.record_engine_failure(request.request_id, "the daemon died while applying it")
            suspect = False
        return Admitted(msg, request, method, body_hash, index=index, suspect=suspect)

    def _decode(self, msg: Message) -> tuple[Request, str]:
        """The message's request, or Rejected: for its record (size, header keys), then its body."""
        max_bytes = self.config.requests.max_bytes
        for k, v in msg.headers:  # what daemon/record_decoding.py made of a record kafka-python could not read
            if k == record_decoding.UNDECODABLE_RECORD_HEADER:
                raise Rejected("undecodable_record", f"{msg.source}: {(v or b'').decode('utf-8', 'replace')}")
            if k.startswith(record_decoding.UNDECODABLE_KEY_PREFIX):
                raise Rejected("undecodable_record", f"{msg.source}: a header key is not UTF-8 (the dead letter "
                                                     "spells its bytes in hex)")
        if msg.size > max_bytes:
            raise Rejected("oversize", f"record of {msg.size} bytes (key, value and headers) > requests.max_bytes "
                                       f"= {max_bytes}")
        return decode(msg.raw, max_bytes=max_bytes, hmac_key=self._hmac_key)

    def _coalescable(self, a: "Admitted") -> bool:
        return (self.config.requests.coalesce and self.registry.engine(a.method, a.request.model).coalescable
                and a.request.forget.sample_ids is not None)

    def _validate_target(self, request: Request) -> str:
        try:
            spec = self.registry.spec(request.model)
        except UnknownModel as exc:
            raise Rejected("unknown_model", str(exc), request.request_id, request.model) from None
        forget = request.forget.to_forget()
        method = self.registry.method_for(request.model, request.method, forget.kind)
        try:
            engine = self.registry.engine(method, request.model)
        except KeyError as exc:
            raise Rejected("unknown_method", str(exc.args[0]), request.request_id, request.model) from None
        try:
            self.registry.precheck(request.model, forget)
        except InvalidForget as exc:
            raise Rejected("invalid_forget", str(exc), request.request_id, request.model) from None
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

    def _engine_change(self, model: str, method: str, target, forget: Forget, isolated: bool, progress=None):
        """The engine's change for `forget`: in this process (with progress events, for engines that report
        them), or (a suspect) in a child process."""
        if not isolated:
            failpoints.hit("in_engine")
            engine = self.registry.engine(method, model)
            if engine.reports_progress and progress is not None:
                progress({"stage": "started"})
                return engine.apply(target, forget, progress=progress)
            return engine.apply(target, forget)
        scratch = self.store.scratch_dir("isolated")
        try:
            change = isolation.apply_isolated(self.config, model, method, forget, scratch)
        except BaseException as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            if isinstance(exc, EngineError) and not isinstance(exc, (InvalidForget, NothingToForget)):
                metrics.ISOLATED_RUNS.labels("engine_died" if isinstance(exc, isolation.EngineProcessDied)
                                             else "engine_error").inc()
            raise
        metrics.ISOLATED_RUNS.labels("ok").inc()
        return change

    def _commit_change(self, model: str, change, target, group: list["Admitted"], durations: dict):
        def finish(artifact_id: str) -> None:
            for a in group:
                self._finish_applied(a, artifact_id, change, durations[a.request.request_id])

        try:
            return self.registry.commit(model, change, target=target,
                                        request_ids=[a.request.request_id for a in group], finish=finish)
        finally:
            if isinstance(change, isolation.StagedChange):
                change.discard()

    def _apply(self, a: "Admitted", attempt: int | None = None) -> None:
        """apply -> persist -> announce for one request, with bounded retries of engine failures."""
        cfg = self.config.requests
        request, method = a.request, a.method
        rid = request.request_id
        if attempt is None:
            self.registry.check_ready(request.model)  # still bootstrapping: pause, and no attempt is recorded
        self._flush_answers_before_engine(a.suspect or self.registry.engine(method, request.model).reports_progress)
        attempt = attempt or self._begin_attempt(a)
        log.info("request %s: %s on %s, forget %d %s (attempt %d%s)", rid, method, request.model,
                 request.forget.size(), a.forget.kind, attempt, ", isolated: it was in hand at a crash"
                 if a.suspect else "")
        while True:
            failures = self.ledger.get_request(rid).engine_failures
            if failures >= cfg.max_attempts:  # e.g. its isolated engine process died again and again
                self._fail(a, f"the engine failed on it {failures} times (requests.max_attempts)")
                return
            target = None
            try:
                failpoints.hit("before_engine")
                target = self.registry.target(request.model)
                change = self._engine_change(request.model, method, target, a.forget, a.suspect,
                                             progress=lambda info: self._progress(a, {"attempt": attempt, **info}
                                                                                  if info.get("stage") == "started"
                                                                                  else info))
                duration = time.perf_counter() - a.msg.polled_at
                committed = self._commit_change(request.model, change, target, [a], {rid: duration})
                failpoints.hit("after_ledger")
                break
            except NothingToForget as exc:
                self._finish_unchanged(a, target, exc)
                return
            except InvalidForget as exc:
                self._reject(a.msg, Rejected("invalid_forget", str(exc), rid, request.model),
                             method=method, body_hash=a.body_hash)
                return
            except Exception as exc:
                kind = transient.kind_of(exc)
                if kind is not None:
                    self._not_suspect.add(rid)
                    raise transient.as_transient(exc, kind) from exc
                error = f"{type(exc).__name__}: {exc}"[:MAX_DETAIL_CHARS]
                failures = self.ledger.record_engine_failure(rid, error)
                if isinstance(exc, EngineError) and not exc.retryable or failures >= cfg.max_attempts:
                    self._fail(a, error)
                    return
                metrics.ENGINE_RETRIES.labels(request.model, method).inc()
                delay = cfg.retry_backoff_s * 2 ** (failures - 1)
                log.warning("request %s: the engine failed (%s, %d of %d); retrying in %.1fs", rid,
                            type(exc).__name__, failures, cfg.max_attempts, delay)
                if self._stop.wait(delay):
                    self._not_suspect.add(rid)
                    raise BrokerLost("stopping during a retry") from None  # uncommitted: redelivered later
                attempt = self._begin_attempt(a)
        self._announce_applied([a], committed, change, target, {rid: duration})

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
        isolated = any(a.suspect for a in group)  # one child for the group; if it dies, one child each
        model, method = group[0].request.model, group[0].method
        self._flush_answers_before_engine(isolated)
        with self.ledger.transaction():
            attempts = [self._begin_attempt(a) for a in group]
        try:
            failpoints.hit("before_engine")
            target = self.registry.target(model)
            engine = self.registry.engine(method, model)
            valid = []
            for a, attempt in zip(group, attempts):  # a request that cannot apply is answered alone
                try:
                    engine.validate(target, a.forget)
                    valid.append((a, attempt))
                except NothingToForget as exc:
                    self._finish_unchanged(a, target, exc)
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
            change = self._engine_change(model, method, target, merged, isolated)
            change.metrics["coalesced_requests"] = float(len(group))
            durations = {a.request.request_id: time.perf_counter() - a.msg.polled_at for a in group}
            committed = self._commit_change(model, change, target, group, durations)
            failpoints.hit("after_ledger")
        except Exception as exc:  # e.g. one request names an unknown sample: let each succeed or fail alone
            kind = transient.kind_of(exc)
            if kind is not None:
                raise transient.as_transient(exc, kind) from exc
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
                                       changed=True, completed_at=_now()), a.request.model)
            metrics.REQUESTS.labels(a.request.model, a.method, "applied").inc()
            metrics.REQUEST_SECONDS.labels(a.request.model, a.method).observe(durations[rid])
            log.info("request %s applied: %s %s in %.3fs", rid, committed.kind, committed.artifact_id, durations[rid])
        model = group[0].request.model
        self._outbox.artifact_event(model, committed.artifact_id, "published",
                                    {"kind": committed.kind, "parent": getattr(target, "version", None)
                                     if is_version else None,
                                     "request_id": group[0].request.request_id,
                                     "request_ids": [a.request.request_id for a in group],
                                     "sha256": committed.sha256, "path": str(committed.path)})
        metrics.LAST_APPLIED.labels(model).set(time.time())
        self._update_model_gauges(model)
        for a in group:
            self._answered(a.msg)

    def _finish_unchanged(self, a: "Admitted", target, exc: NothingToForget) -> None:
        """Everything the request names is already forgotten: it is satisfied as it stands. Answered `applied`
        with the current head and `changed: false`; no new version."""
        request = a.request
        head = getattr(target, "version", None)
        duration = time.perf_counter() - a.msg.polled_at
        measures = {"forgotten": 0.0, "already_forgotten": float(exc.already_forgotten)}
        self.ledger.finish(request.request_id, "applied", model=request.model, method=a.method,
                           subject=request.subject, body_sha256=a.body_hash, artifact_id=head, metrics=measures,
                           duration_s=duration, source=a.msg.source)
        self._outbox.result(Result(request_id=request.request_id, model=request.model, status="applied",
                                   method=a.method, version=head, metrics=measures, duration_s=duration,
                                   subject=request.subject, changed=False, completed_at=_now()), request.model)
        metrics.REQUESTS.labels(request.model, a.method, "applied").inc()
        log.info("request %s applied without change: every named sample is already forgotten by %s",
                 request.request_id, head)
        self._answered(a.msg)

    # --- outcomes other than applied -----------------------------------------------------------------------

    def _reject(self, msg: Message, rej: Rejected, *, method: str | None = None, body_hash: str | None = None,
                record: bool = True) -> None:
        log.warning("rejected message %s: %s (request_id=%s)", msg.source, rej.reason, rej.request_id)
        # The ledger first: if it cannot be written (a full disk), nothing was sent and the message comes again.
        if record and rej.request_id:
            self.ledger.finish(rej.request_id, "rejected", model=rej.model, method=method, body_sha256=body_hash,
                               reason=rej.reason, error=rej.detail, source=msg.source)
        else:  # no id to file it under, or the id belongs to another request: an audit event only
            self.ledger.record_rejection(rej.reason, msg.source, request_id=rej.request_id, model=rej.model)
        self._outbox.dead_letter(msg.raw, msg.key, msg.headers, reason=rej.reason, error=rej.detail, source=msg.source)
        key = rej.model or (msg.key[:256].decode("utf-8", "replace") if msg.key else None)
        self._outbox.result(Result(request_id=rej.request_id, model=rej.model, status="rejected", method=method,
                                   reason=rej.reason, error=rej.detail, completed_at=_now()), key)
        metrics.DLQ.labels(rej.reason).inc()
        metrics.REQUESTS.labels(rej.model if rej.model in self.config.models else "", method or "", "rejected").inc()
        self._answered(msg)

    def _fail(self, a: "Admitted", error: str) -> None:
        request, method = a.request, a.method
        log.error("request %s failed: %s", request.request_id, error)
        self.ledger.finish(request.request_id, "failed", model=request.model, method=method, subject=request.subject,
                           body_sha256=a.body_hash, reason="engine_failed", error=error, source=a.msg.source)
        self._outbox.dead_letter(a.msg.raw, a.msg.key, a.msg.headers, reason="engine_failed", error=error,
                                 source=a.msg.source)
        self._outbox.result(Result(request_id=request.request_id, model=request.model, status="failed", method=method,
                                   reason="engine_failed", error=error, subject=request.subject, completed_at=_now()),
                            request.model)
        metrics.DLQ.labels("engine_failed").inc()
        metrics.REQUESTS.labels(request.model, method, "failed").inc()
        self._answered(a.msg)

    def _answer_duplicate(self, row: RequestRow, msg: Message) -> None:
        """A re-sent request, or a redelivery of one whose answer may not have gone out before a crash: repeat the
        recorded answer, change nothing. A redelivery of the very record also repeats what went with the answer:
        the artifact event of an applied request (if still active), the dead letter of a failed one."""
        artifact = self.ledger.get_artifact(row.model, row.artifact_id) if row.artifact_id else None
        kind = artifact.kind if artifact else None
        unchanged = row.metrics.get("forgotten") == 0 and "already_forgotten" in row.metrics
        self._outbox.result(Result(request_id=row.request_id, model=row.model, status=row.status, method=row.method,
                                   version=row.artifact_id if kind == "version" else None,
                                   adapter_id=row.artifact_id if kind == "adapter" else None, metrics=row.metrics,
                                   duration_s=row.duration_s, reason=row.reason, error=row.error, subject=row.subject,
                                   changed=(not unchanged) if row.status == "applied" else None,
                                   completed_at=datetime.fromtimestamp(row.completed_at or time.time(), timezone.utc)),
                            row.model)
        if msg.source == row.source:
            if row.status == "failed":
                self._outbox.dead_letter(msg.raw, msg.key, msg.headers, reason="engine_failed", error=row.error or "",
                                         source=msg.source)
            elif artifact is not None and artifact.active and not unchanged:
                self._outbox.artifact_event(row.model, artifact.id, "published",
                                            {"kind": artifact.kind, "parent": artifact.parent,
                                             "request_id": artifact.request_id, "sha256": artifact.sha256,
                                             "path": artifact.path})
        metrics.REQUESTS.labels(row.model or "", row.method or "", "duplicate").inc()
        log.info("request %s already %s; answered from the ledger", row.request_id, row.status)
        self._answered(msg)


def _now() -> datetime:
    return datetime.now(timezone.utc)

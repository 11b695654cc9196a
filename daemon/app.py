"""The daemon: one object owns the loop (poll, process, commit), its errors and its shutdown.

Per message, in the order of DESIGN.md's data flow, each step in its own module::

    admit (decode, validate, dedupe: admission.py) -> apply (engine) -> persist (artifact, then ledger: applying.py)
    -> answer (ledger row, result, dead letter, metrics: outcomes.py) -> commit (here)

Offsets are committed only after the ledger rows are durable and the producer has flushed the result events:
at-least-once delivery, exactly-once effect. How each kind of trouble is met:

- bad input (any content, header or size): a dead letter with its reason (`Outcomes.rejected`), never a crash;
- a request the engine fails on (raises, or its isolated process dies) `max_attempts` times: `Outcomes.failed`;
- a kill of the daemon: nothing is counted; a request that was in hand is a *suspect* and is applied next in a
  child process (daemon/isolation.py), which tells a request that kills the engine from a deploy that killed us;
- a full disk or a busy ledger (daemon/transient.py): the pipeline pauses and retries the message with backoff;
- a lost, frozen or wiped broker (daemon/liveness.py): all clients are recreated when it answers again
  (daemon/connection.py);
- a record kafka-python cannot decode (daemon/record_decoding.py): dead-lettered as `undecodable_record` with
  what can be recovered of it and its offset; its partition moves on.

The engine runs in a worker thread while the main thread keeps polling with the partitions paused, so that long
engine work never gets the consumer evicted from its group.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from adapters.store import ArtifactStore
from daemon import failpoints, kafka_io, metrics, transient
from daemon.admission import Admission, Admitted, Message
from daemon.applying import Applier
from daemon.bootstrapping import build_in_background
from daemon.broker import EmbeddedBroker
from daemon.config import Config, bootstrap_servers
from daemon.connection import Connection
from daemon.engine_configs import check_engines
from daemon.group_watch import GroupStalled
from daemon.ledger import ArtifactRow, open_ledger
from daemon.liveness import BrokerLost
from daemon.models import ModelRegistry
from daemon.outcomes import Outcomes
from daemon.state_lock import state_lock
from daemon.transient import Transient

log = logging.getLogger("unlearnd")
T = TypeVar("T")

KEEPALIVE_S = 1.0  # while the engine works, the main thread polls (partitions paused) this often


class StartupError(Exception):
    """The daemon cannot start (a port taken, a model that cannot be built): one line for the operator."""


class StopDuringStartup(BaseException):
    """Raised by the signal handler to abandon start-up (a first-start bootstrap trains for minutes). A
    BaseException, so no `except Exception` on the way swallows it; not KeyboardInterrupt itself, because CPython
    3.11 can remember a KeyboardInterrupt raised inside C-evaluated code (an import, say) and end the process by
    SIGINT at exit even after it was caught."""


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self._state_lock = state_lock(config.state).acquire()  # first: nothing is touched before it
        self.store = ArtifactStore(config.state.artifacts_path)
        self.ledger = open_ledger(config.state)
        self.registry = ModelRegistry(config, self.store, self.ledger)
        self.broker: EmbeddedBroker | None = None
        self.bootstrap_servers = bootstrap_servers(config)  # the embedded broker's loopback port, or the cluster
        self._stop = threading.Event()
        self._starting = False  # during start(): a stop signal interrupts at once (bootstrap can take minutes)
        self._conn: Connection | None = None  # the consumer, the producer and the broker watch, while connected
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unlearnd-engine")
        self._not_suspect: set[str] = set()  # ids this process interrupted cleanly (a pause, a stop): no crash
        self.outcomes = Outcomes(config, self.ledger)  # holds the connection's Outbox while connected
        self.admission = Admission(config, self.registry, self.ledger, self.outcomes, self._not_suspect)
        self.applier = Applier(config, self.registry, self.store, self.ledger, self.outcomes, self._stop,
                               self._not_suspect)
        self._transient: Transient | None = None
        self._paused_by: str | None = None
        self._transient_backoff = config.requests.retry_backoff_s
        self._bootstrapper: threading.Thread | None = None  # builds models whose bootstrap runs in the background

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, *, progress: bool = True) -> None:
        """Everything before the loop: metrics endpoint (so probes see `unlearnd_bootstrapping`), broker (if
        embedded), state, models. Raises StartupError or ConfigError for what an operator must fix."""
        check_engines(self.config, self.registry)
        self.registry.check_methods()
        kafka_io.check_secrets(self.config.kafka)
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
        cleaned = self.store.clean_staging()
        if cleaned:
            log.info("removed %d unfinished artifact write(s) left by a crash", cleaned)
        if not self.config.models:
            log.warning("%s registers no model: every request will be rejected as for an unknown model",
                        self.config.source or "the configuration")
        later = []
        for name in self.config.models:
            if self.registry.bootstraps_later(name):
                later.append(name)
                continue
            self._model_ready(name, self.registry.ensure_bootstrapped(name, progress=progress))
        self.outcomes.count_rollbacks()
        metrics.BOOTSTRAPPING.set(0)
        if later:
            log.info("model(s) %s have no version yet: built in the background while the daemon consumes; their "
                     "requests wait until they are ready", ", ".join(later))
            self._bootstrapper = threading.Thread(target=build_in_background,
                                                  args=(self.registry, later, self._stop, self._model_ready),
                                                  name="unlearnd-bootstrap", daemon=True)
            self._bootstrapper.start()

    def _model_ready(self, name: str, head: ArtifactRow | None) -> None:
        self.outcomes.update_model_gauges(name)
        log.info("model %s ready at %s", name, head.id if head is not None else "its base weights")
        self.registry.prepare(name)

    def stop(self, *_args: object) -> None:
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
            except GroupStalled as exc:  # in the group, given nothing, while requests wait: join with a new consumer
                metrics.GROUP_REJOINS.inc()
                log.warning("rejoining the consumer group: %s", exc)
                self._close_clients(graceful=True)
            except (BrokerLost, KafkaError, OSError) as exc:
                if self._stop.is_set():
                    break
                metrics.BROKER_CONNECTED.set(0)
                if self._conn is not None:  # lost now; a reconnect that fails again is the same outage
                    metrics.BROKER_DISCONNECTS.inc()
                log.warning("broker unavailable (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                self._close_clients(graceful=False)
                self._revive_embedded_broker()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.kafka.reconnect_backoff_max_s)

    def _revive_embedded_broker(self) -> None:
        """The embedded broker is the daemon's own child: if it exited, start it again rather than wait for it
        forever. The requests it held are gone (producers send them again); the ledger keeps what was applied."""
        try:
            code = self.broker.restart_if_exited() if self.broker is not None else None
        except RuntimeError as exc:  # e.g. something else took its port: tried again after the next backoff
            log.error("could not start the embedded broker again: %s", exc)
            return
        if code is not None:
            log.error("the embedded broker exited (code %s); started it again: it is memory-only, so the records "
                      "it held are gone", code)

    def close(self) -> None:
        self._close_clients(graceful=True)
        self._worker.shutdown(wait=True)
        if self._bootstrapper is not None:
            self._stop.set()
            self._bootstrapper.join()  # stops within one training step
        self.ledger.close()
        self.store.close()
        if self.broker:
            self.broker.stop()
        self._state_lock.release()
        log.info("stopped")

    # --- connection -----------------------------------------------------------------------------------------

    def _connect(self) -> None:
        """(Re)connect: new clients and a new broker watch (daemon/connection.py), then announce the adapters."""
        if self._conn is not None:
            return
        self._conn = Connection.open(self.config, self.bootstrap_servers)
        self.outcomes.outbox = self._conn.outbox
        self.outcomes.announce_adapters()
        metrics.BROKER_CONNECTED.set(1)
        cfg = self.config.kafka
        log.info("connected to %s, consuming %s as group %s", self.bootstrap_servers, cfg.topics.requests,
                 cfg.group_id)

    def _close_clients(self, *, graceful: bool) -> None:
        conn, self._conn, self.outcomes.outbox = self._conn, None, None
        if conn is not None:
            conn.close(graceful=graceful)

    @property
    def _consumer(self) -> Any:  # a KafkaConsumer, or None while disconnected: the loop reads it only when connected
        return self._conn.consumer if self._conn is not None else None

    def _check_broker(self) -> None:
        if self._conn is not None:
            self._conn.check()

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
                transient.unless_transient(self.outcomes.count_rollbacks)
            if self._transient is not None:
                self._pause_for(self._transient)
                self._transient = None
            elif self._paused_by is not None:  # the condition cleared: the retried messages went through
                log.info("resumed: %s cleared", self._paused_by)
                metrics.PAUSED.labels(self._paused_by).set(0)
                self._paused_by = None
                self._transient_backoff = self.config.requests.retry_backoff_s

    def _commit(self, done: dict[TopicPartition, int]) -> None:
        if not done and not self.outcomes.unmarked:
            return
        self.outcomes.flush()
        if not done:
            return
        failpoints.hit("before_offset_commit")
        self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in done.items()}, timeout_ms=30_000)
        try:
            self.ledger.forget_answered({(tp.topic, tp.partition): off for tp, off in done.items()})
        except Exception as exc:  # the marks only save a repeated answer; a full disk must not stop the loop
            log.debug("could not prune answered marks: %s", exc)

    def _while_polling(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` in the worker thread. Meanwhile keep polling with every partition paused: the consumer stays
        in its group however long the engine takes, and heartbeats and rebalances are served."""
        future = self._worker.submit(fn, *args)
        paused: list[TopicPartition] = []
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
            self._resume(paused)

    def _resume(self, partitions: list[TopicPartition]) -> None:
        """Resume what this loop paused and still holds: a rebalance meanwhile may have taken some away."""
        consumer = self._consumer
        if partitions and consumer is not None:
            consumer.resume(*(set(partitions) & consumer.assignment()))

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
            self._resume(assigned)
        self._transient_backoff = min(delay * 2 or 0.1, self.config.requests.transient_backoff_max_s)

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
            self.admission.start_batch(msgs)
            for i, msg in enumerate(msgs):
                if self._stop.is_set():
                    self.applier.apply_group(group)
                    return i
                admitted = self.admission.admit(msg, i)
                if admitted is not None and any(g.request.request_id == admitted.request.request_id for g in group):
                    self.applier.apply_group(group)  # the same id twice in one poll: the second is a duplicate
                    group = []
                    admitted = self.admission.admit(msg, i)
                if admitted is None:
                    continue
                if not self.applier.coalescable(admitted):
                    self.applier.apply_group(group)
                    group = []
                    self.applier.apply(admitted)
                elif group and (group[0].request.model, group[0].method) != (admitted.request.model,
                                                                             admitted.method):
                    self.applier.apply_group(group)
                    group = [admitted]
                else:
                    group.append(admitted)
            i = len(msgs)
            self.applier.apply_group(group)
            return len(msgs)
        except Exception as exc:
            kind = transient.kind_of(exc)
            if kind is None:
                raise
            self._transient = transient.as_transient(exc, kind)
            self._not_suspect.update(g.request.request_id for g in group)
            return min([g.index for g in group] + [i])

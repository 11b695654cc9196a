"""Which adapters `unlearnd serve` applies: exactly the ledger's active ones, kept in step three ways.

The ledger (which adapter is active) and the artifact store (its files and their sha256) are the truth; the
adapters topic only announces changes, and a memory-only broker forgets them on a restart. So serve:

- at start, reads the ledger read-only and loads every active adapter before it answers a request;
- follows the topic: an event triggers an immediate reconcile from the ledger, or, where no ledger is readable
  (a router on a host that does not mount it), is applied as announced;
- reconciles from the ledger every `serve.reconcile_s` anyway, so a lost or missed event (a broker or daemon
  restart, a rollback announced while the router was down) cannot leave a rolled-back adapter in or an active
  one out. The daemon also re-announces every adapter's state whenever it (re)connects to the broker.

Threads: the follower alone touches its KafkaConsumer (kafka-python's consumer is not thread-safe) and publishes
what others need of it as one immutable `TopicState`; the reconciler owns the ledger reads; both change the served
set only through `AdapterSet.sync`, under one lock. The follower watches the cluster with the daemon's liveness
probe (a DescribeCluster round trip, daemon/liveness.py), not a TCP connect that a frozen broker still accepts.
Loaded files are checked against the sha256 recorded at publish time; an active adapter that cannot be loaded is
reported by `/healthz` (503: a forgotten answer could come back through it), never skipped silently.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kafka import KafkaConsumer, TopicPartition

from adapters.store import tree_sha256
from daemon import kafka_io, liveness
from daemon.config import Config, bootstrap_servers
from daemon.ledger import read_adapters
from daemon.ledger_backends import PostgresTarget
from detector.gate import GATE_SUBDIR, has_gate

if TYPE_CHECKING:
    from detector.routed_model import RoutedModel

log = logging.getLogger("unlearnd.serve")

LOAD_EVENTS = ("published", "restored")
UNLOAD_EVENTS = ("rolled_back",)


@dataclass(frozen=True)
class TopicState:
    """What the follower thread knows of the adapters topic, replaced whole (so a reader never sees half of it)."""

    connected: bool = False  # the cluster answers and the follower reads the topic
    caught_up: bool = False  # the topic was replayed to its end since the follower (re)connected


@dataclass(frozen=True)
class AdapterRef:
    adapter_id: str
    path: Path
    sha256: str | None = None  # None: announced without one; the files are loaded unchecked
    created_at: float | None = None


class AdapterSet:
    """The adapters a `detector.RoutedModel` serves for one model, and what that set was decided from."""

    def __init__(self, model: str, routed: RoutedModel, *, ledger_path: Path | PostgresTarget | None,
                 reconcile_s: float,
                 lazy: bool = False):
        self.model = model
        self.routed = routed
        self.ledger_path = ledger_path
        self.reconcile_s = reconcile_s
        self.lazy = lazy  # route-only serving: gates only, no LoRA weights
        self.loaded: dict[str, AdapterRef] = {}
        self.failed: dict[str, str] = {}  # active adapter -> why it is not loaded
        self.announced: dict[str, tuple[bool, AdapterRef]] = {}  # the topic's latest word per adapter
        self.ledger_error: str | None = "not read yet"
        self.last_reconcile: float | None = None
        self.topic = TopicState()  # published by the follower thread
        self.changed = threading.Event()  # set by the follower: reconcile now
        self._lock = threading.RLock()

    # --- sources ---------------------------------------------------------------------------------
    def reconcile(self) -> bool:
        """Bring the served set to the ledger's active adapters; False when the ledger cannot be read (then
        the topic's announcements are applied instead)."""
        if self.ledger_path is None:
            self.ledger_error = "no ledger configured"
        else:
            try:
                rows = read_adapters(self.ledger_path, self.model)
            except Exception as exc:  # missing, locked, unreadable: fall back to what the topic announced
                if self.ledger_error is None:
                    log.warning("ledger %s unreadable (%s); serving the adapters the topic announces",
                                self.ledger_path, exc)
                self.ledger_error = f"{type(exc).__name__}: {exc}"
            else:
                self.sync({r.id: AdapterRef(r.id, Path(r.path), r.sha256, r.created_at) for r in rows if r.active})
                self.ledger_error, self.last_reconcile = None, time.time()
                return True
        with self._lock:
            self.sync({aid: ref for aid, (active, ref) in self.announced.items() if active})
        return False

    def on_event(self, event: dict[str, Any]) -> None:
        """One adapters-topic event (the follower's thread): remembered, then a reconcile is due now."""
        if event.get("model") != self.model or not event.get("artifact_id"):
            return
        kind = event.get("event")
        active = bool(event.get("active")) if kind == "announced" else \
            True if kind in LOAD_EVENTS else False if kind in UNLOAD_EVENTS else None
        if active is None or (active and not event.get("path")):
            return
        aid = str(event["artifact_id"])
        with self._lock:
            self.announced[aid] = (active, AdapterRef(aid, Path(event.get("path") or "."), event.get("sha256")))
        self.changed.set()

    # --- the served set ----------------------------------------------------------------------------
    def sync(self, desired: dict[str, AdapterRef]) -> None:
        """Unload what is not desired, load what is missing or changed (by sha256)."""
        with self._lock:
            for aid in [a for a in self.loaded if a not in desired]:
                self.routed.remove_adapter(aid)
                del self.loaded[aid]
                log.info("adapter %s of %s unloaded", aid, self.model)
            self.failed = {a: why for a, why in self.failed.items() if a in desired}
            for aid, ref in desired.items():
                have = self.loaded.get(aid)
                if have is not None and (have.sha256 == ref.sha256 or ref.sha256 is None):
                    continue
                try:
                    self._check(ref)
                    self.routed.add_adapter(aid, ref.path, lazy=self.lazy)
                except Exception as exc:  # tried again at every reconcile; logged when the reason changes
                    why = f"{type(exc).__name__}: {exc}"
                    if self.failed.get(aid) != why:
                        log.error("active adapter %s of %s cannot be loaded: %s", aid, self.model, why)
                    self.failed[aid] = why
                    continue
                self.failed.pop(aid, None)
                self.loaded[aid] = ref
                log.info("adapter %s of %s loaded", aid, self.model)

    @staticmethod
    def _check(ref: AdapterRef) -> None:
        if not has_gate(ref.path):
            raise FileNotFoundError(f"no gate at {ref.path / GATE_SUBDIR}")
        if ref.sha256 is not None and tree_sha256(ref.path) != ref.sha256:
            raise ValueError(f"files at {ref.path} do not match their recorded sha256")

    # --- health ----------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """(ok, report): ok when every active adapter is loaded and the set comes from a live source (the ledger,
        read within the last three reconcile periods, or else a topic replayed to its end)."""
        with self._lock:
            fresh = self.last_reconcile is not None and time.time() - self.last_reconcile < 3 * self.reconcile_s + 5
            topic = self.topic
            source = "ledger" if self.ledger_error is None and fresh else \
                "topic" if topic.connected and topic.caught_up else None
            ok = source is not None and not self.failed
            return ok, {
                "status": "ok" if ok and topic.connected and source == "ledger" else "degraded" if ok
                else "unavailable",
                "adapters_loaded": sorted(self.loaded), "adapters_failed": dict(self.failed), "source": source,
                "ledger": {"readable": self.ledger_error is None, "error": self.ledger_error,
                           "last_reconcile": self.last_reconcile},
                "broker": {"connected": topic.connected, "caught_up": topic.caught_up},
            }


class Reconciler(threading.Thread):
    """Reconciles from the ledger every `reconcile_s`, and at once when the follower saw an event."""

    def __init__(self, adapters: AdapterSet):
        super().__init__(name="adapters-reconciler", daemon=True)
        self.adapters = adapters
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.adapters.changed.wait(self.adapters.reconcile_s)
            self.adapters.changed.clear()
            if self.stopping.is_set():
                break
            try:
                self.adapters.reconcile()
            except Exception:  # never let the reconciler die: the next period tries again
                log.exception("reconciling the adapters of %s failed", self.adapters.model)

    def stop(self) -> None:
        self.stopping.set()
        self.adapters.changed.set()


class AdapterFollower(threading.Thread):
    """Replays the compacted adapters topic from the beginning, then follows it; no consumer group (every
    replica sees everything). Reconnects with a fresh consumer (replaying again) whenever the cluster was lost:
    a restarted memory-only broker starts empty, and the daemon's re-announcement arrives on the new topic."""

    def __init__(self, adapters: AdapterSet, cfg: Config):
        super().__init__(name="adapters-follower", daemon=True)
        self.adapters, self.cfg = adapters, cfg
        self.bootstrap = bootstrap_servers(cfg)
        self.topic = cfg.kafka.topics.adapters
        self.stopping = threading.Event()

    def run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            consumer = watch = None
            try:
                cluster = liveness.probe(self.cfg.kafka, self.bootstrap)  # raises while the cluster does not answer
                # No gauge: unlearnd_broker_connected is the daemon's; serving reports the topic in /healthz.
                watch = liveness.BrokerWatch(self.cfg.kafka, self.bootstrap, cluster, name="adapters-broker-watch")
                watch.start()
                consumer = kafka_io.make_reader(self.cfg.kafka, self.bootstrap, auto_offset_reset="earliest")
                self._follow(consumer, watch)
                backoff = 0.5
            except Exception as exc:
                if self.adapters.topic.connected:
                    log.warning("adapters topic unavailable (%s); following again when the broker is back", exc)
                self.adapters.topic = TopicState()
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if watch is not None:
                    watch.stop()
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:  # closing a client of a dead broker may fail; nothing is lost
                        pass

    def _follow(self, consumer: KafkaConsumer, watch: liveness.BrokerWatch) -> None:
        """Only this thread calls the consumer; what it learns is published as `adapters.topic`."""
        assigned: list[TopicPartition] = []
        caught_up = False
        while not self.stopping.is_set():
            if watch.lost.is_set():
                raise ConnectionError(f"lost {self.bootstrap}: {watch.reason}")
            if not assigned:  # the topic appears when the daemon creates it (e.g. after a broker restart)
                parts = consumer.partitions_for_topic(self.topic)
                if parts:
                    assigned = [TopicPartition(self.topic, p) for p in sorted(parts)]
                    consumer.assign(assigned)
                    consumer.seek_to_beginning(*assigned)
            records = consumer.poll(timeout_ms=200) if assigned else {}
            if not assigned:
                self.stopping.wait(0.5)
            for batch in records.values():
                for rec in batch:
                    try:
                        self.adapters.on_event(json.loads(rec.value))
                    except Exception:  # one bad event must not stop the follower
                        log.exception("adapters event at offset %s not applied", rec.offset)
            if assigned and not caught_up:  # from positions and fetch high-water marks (end_offsets is unreliable)
                caught_up = all((high := consumer.highwater(tp)) is not None and consumer.position(tp) >= high
                                for tp in assigned)
            if self.adapters.topic != (state := TopicState(connected=True, caught_up=caught_up)):
                self.adapters.topic = state

    def stop(self) -> None:
        self.stopping.set()


def stop(threads: tuple[Reconciler, AdapterFollower], timeout_s: float = 30.0) -> None:
    """Stop the threads `start` returned and wait for them: one still inside torch or faiss (loading an adapter)
    when the interpreter exits can abort the process ("terminate called without an active exception")."""
    for t in threads:
        t.stop()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def start(adapters: AdapterSet, cfg: Config, *, wait_s: float = 10.0) -> tuple[Reconciler, AdapterFollower]:
    """Read the ledger once (or wait up to `wait_s` for the topic when the ledger is unreadable), then keep
    the set in step in the background. Returns the two threads (stop them when serving ends)."""
    follower = AdapterFollower(adapters, cfg)
    follower.start()
    if not adapters.reconcile():
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not adapters.topic.caught_up:
            time.sleep(0.1)
        adapters.reconcile()
    reconciler = Reconciler(adapters)
    reconciler.start()
    return reconciler, follower

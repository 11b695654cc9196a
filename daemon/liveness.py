"""Is the Kafka cluster really there? A real request with a deadline, asked from a thread of its own.

A TCP connect proves nothing: a frozen broker (SIGSTOP, a hung JVM, a full network buffer) still completes the
handshake in the kernel. So the daemon, and the serving follower of the adapters topic, ask the cluster a question
(DescribeCluster, which also works on the embedded Tansu broker) with a timeout, every `kafka.liveness_interval_s`,
from a thread that the caller's own work (an engine step, a flush, a poll) can never hold up. Two failed probes in
a row, or a different cluster id (a broker that came back empty), mark the connection lost: the watch's gauge (the
daemon's `unlearnd_broker_connected`; none for the follower) drops to 0 at once, and the owner reconnects
(re-creating its clients) as soon as it sees the flag.
"""

from __future__ import annotations

import logging
import threading

from kafka import KafkaAdminClient
from prometheus_client import Gauge

from daemon.config import Kafka
from daemon.kafka_io import make_admin

log = logging.getLogger(__name__)

FAILURES_BEFORE_LOST = 2


class BrokerLost(Exception):
    """The cluster is gone (or the daemon is stopping with a message in hand): drop the clients, reconnect, and let
    uncommitted records come again."""


def cluster_id(admin: KafkaAdminClient) -> str:
    """The cluster's id, from a real round trip (raises on timeout or error)."""
    return admin.describe_cluster()["cluster_id"] or ""


def probe(cfg: Kafka, bootstrap: str) -> str:
    """One liveness probe with its own short-lived client: the cluster's id, or an exception."""
    admin = make_admin(cfg, bootstrap, cfg.liveness_timeout_s)
    try:
        return cluster_id(admin)
    finally:
        _close(admin)


class BrokerWatch(threading.Thread):
    """Probes the cluster in the background until stopped; `lost` is set (and `gauge`, if given, set to 0) when it
    stops answering or answers with another cluster id."""

    def __init__(self, cfg: Kafka, bootstrap: str, expected_cluster_id: str, *, gauge: Gauge | None = None,
                 name: str = "unlearnd-broker-watch"):
        super().__init__(name=name, daemon=True)
        self.cfg = cfg
        self.bootstrap = bootstrap
        self.expected = expected_cluster_id
        self.gauge = gauge
        self.lost = threading.Event()
        self.reason = ""
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        admin, failures = None, 0
        try:
            while not self._stop.wait(self.cfg.liveness_interval_s) and not self.lost.is_set():
                try:
                    admin = admin or make_admin(self.cfg, self.bootstrap, self.cfg.liveness_timeout_s)
                    seen = cluster_id(admin)
                except Exception as exc:  # kafka-python raises several unrelated types for a dead cluster
                    failures += 1
                    _close(admin)
                    admin = None
                    if failures >= FAILURES_BEFORE_LOST:
                        self._mark_lost(f"no answer from the cluster ({type(exc).__name__})")
                    continue
                failures = 0
                if seen != self.expected:
                    self._mark_lost(f"cluster id changed from {self.expected!r} to {seen!r}: the broker lost its state")
        finally:
            _close(admin)

    def _mark_lost(self, reason: str) -> None:
        if self._stop.is_set():
            return
        self.reason = reason
        if self.gauge is not None:
            self.gauge.set(0)
        self.lost.set()


def _close(admin: KafkaAdminClient | None) -> None:
    if admin is not None:
        try:
            admin.close()
        except Exception as exc:  # closing a client of a dead cluster may fail; nothing is lost by it
            log.debug("error closing the liveness admin client: %s", exc)

"""Is the Kafka cluster really there? A real request with a deadline, asked from a thread of its own.

A TCP connect proves nothing: a frozen broker (SIGSTOP, a hung JVM, a full network buffer) still completes the
handshake in the kernel. So the daemon asks the cluster a question (DescribeCluster, which also works on the
embedded Tansu broker) with a timeout, every `kafka.liveness_interval_s`, from a thread that the main loop's own
work (an engine step, a flush) can never hold up. Two failed probes in a row, or a different cluster id (a broker
that came back empty), mark the connection lost: `unlearnd_broker_connected` drops to 0 at once, and the loop
reconnects (re-creating its topics) as soon as it sees the flag.
"""

from __future__ import annotations

import logging
import threading

from kafka import KafkaAdminClient

from daemon import metrics
from daemon.config import Kafka

log = logging.getLogger(__name__)

FAILURES_BEFORE_LOST = 2


def admin_client(cfg: Kafka, bootstrap: str, timeout_s: float) -> KafkaAdminClient:
    from daemon.kafka_io import connection_settings

    ms = max(1000, int(timeout_s * 1000))
    return KafkaAdminClient(**connection_settings(cfg, bootstrap), request_timeout_ms=ms, bootstrap_timeout_ms=ms)


def cluster_id(admin: KafkaAdminClient) -> str:
    """The cluster's id, from a real round trip (raises on timeout or error)."""
    return admin.describe_cluster()["cluster_id"] or ""


class BrokerWatch(threading.Thread):
    def __init__(self, cfg: Kafka, bootstrap: str, expected_cluster_id: str):
        super().__init__(name="unlearnd-broker-watch", daemon=True)
        self.cfg = cfg
        self.bootstrap = bootstrap
        self.expected = expected_cluster_id
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
                    admin = admin or admin_client(self.cfg, self.bootstrap, self.cfg.liveness_timeout_s)
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
        metrics.BROKER_CONNECTED.set(0)
        self.lost.set()


def _close(admin: KafkaAdminClient | None) -> None:
    if admin is not None:
        try:
            admin.close()
        except Exception as exc:  # closing a client of a dead cluster may fail; nothing is lost by it
            log.debug("error closing the liveness admin client: %s", exc)

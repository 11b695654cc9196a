"""The liveness probe (a DescribeCluster round trip) shared by the daemon and the serving follower: it sees a live
cluster by its id, marks a silent one lost, and moves the daemon's `unlearnd_broker_connected` only when asked to
(the serving follower's watch has no gauge)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from daemon import liveness, metrics
from daemon.broker import free_port
from daemon.config import Kafka

FAST = Kafka(liveness_interval_s=0.2, liveness_timeout_s=1.0)


def _connected_gauge() -> float | None:
    return REGISTRY.get_sample_value("unlearnd_broker_connected")


def test_probe_answers_with_the_cluster_id_of_a_live_broker(broker):
    assert liveness.probe(FAST, broker.bootstrap_servers) == broker.cluster_id
    watch = liveness.BrokerWatch(FAST, broker.bootstrap_servers, broker.cluster_id)
    watch.start()
    try:
        assert not watch.lost.wait(1.5), watch.reason  # several probes, all answered
    finally:
        watch.stop()


def test_a_silent_cluster_is_lost_and_only_a_watch_with_the_gauge_moves_it():
    nowhere = f"127.0.0.1:{free_port()}"
    metrics.BROKER_CONNECTED.set(1)
    follower_watch = liveness.BrokerWatch(FAST, nowhere, "some-cluster", name="test-follower-watch")
    follower_watch.start()
    assert follower_watch.lost.wait(30) and "no answer" in follower_watch.reason
    assert _connected_gauge() == 1.0, "the follower's watch must not touch the daemon's gauge"
    daemon_watch = liveness.BrokerWatch(FAST, nowhere, "some-cluster", gauge=metrics.BROKER_CONNECTED)
    daemon_watch.start()
    assert daemon_watch.lost.wait(30)
    assert _connected_gauge() == 0.0

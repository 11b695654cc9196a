"""The daemon's session with the Kafka cluster: its group consumer, its producer (as an Outbox) and the watch that
tells when the cluster is lost. Opened on every (re)connect, closed as a whole: after a broker restart every client
is new (an idempotent producer is fenced once a broker has lost its state).
"""

from __future__ import annotations

import logging

from kafka import KafkaConsumer, KafkaProducer

from daemon import kafka_io, liveness, metrics, record_decoding
from daemon.config import Config
from daemon.group_watch import UnassignedWatch
from daemon.liveness import BrokerLost

log = logging.getLogger("unlearnd")


class Connection:
    def __init__(self, consumer: KafkaConsumer, outbox: kafka_io.Outbox, watch: liveness.BrokerWatch,
                 unassigned: UnassignedWatch):
        self.consumer = consumer
        self.outbox = outbox
        self.watch = watch
        self.unassigned = unassigned

    @classmethod
    def open(cls, config: Config, bootstrap: str) -> Connection:
        """Ask the cluster a real question, (re-)create the topics, then the clients, then watch the cluster."""
        cfg, max_bytes = config.kafka, config.requests.max_bytes
        admin = kafka_io.make_admin(cfg, bootstrap, cfg.liveness_timeout_s)
        try:
            cluster = liveness.cluster_id(admin)
            if cfg.create_topics:
                kafka_io.ensure_topics(cfg, bootstrap, max_bytes, admin=admin)
        finally:
            admin.close()
        record_decoding.install()
        producer = kafka_io.make_producer(cfg, bootstrap, max_bytes)
        try:
            consumer = kafka_io.make_consumer(cfg, bootstrap, cfg.topics.requests)
        except BaseException:
            _close_producer(producer)
            raise
        watch = liveness.BrokerWatch(cfg, bootstrap, cluster, gauge=metrics.BROKER_CONNECTED)
        watch.start()
        return cls(consumer, kafka_io.Outbox(producer, cfg, max_bytes), watch,
                   UnassignedWatch(cfg.topics.requests, cfg.unassigned_rejoin_s))

    def check(self) -> None:
        """Raise BrokerLost once the watch has seen the cluster go; GroupStalled (a BrokerLost) when this member has
        held no partition too long while requests wait (daemon/group_watch.py)."""
        if self.watch.lost.is_set():
            raise BrokerLost(self.watch.reason)
        self.unassigned.check(self.consumer)

    def close(self, *, graceful: bool) -> None:
        self.watch.stop()
        try:
            kafka_io.close_consumer(self.consumer, timeout_ms=5000 if graceful else 1000)
        except Exception as exc:  # closing a client of a dead broker may fail; nothing is lost by it
            log.debug("error while closing the consumer: %s", exc)
        _close_producer(self.outbox.producer)


def _close_producer(producer: KafkaProducer) -> None:
    try:
        producer.close(timeout=2)
    except Exception as exc:
        log.debug("error while closing the producer: %s", exc)

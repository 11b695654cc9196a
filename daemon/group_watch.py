"""A consumer that is in its group but given nothing to do while requests wait: close it and join anew.

A consumer group can wedge: a broker's group coordinator can keep every live member connected, heartbeating and
`STABLE` with no partition assigned while requests pile up in the topic. Tansu 0.6.0 (the embedded broker) did so
for good whenever the group's leader sent LeaveGroup during a rebalance; the daemon no longer sends one
(kafka_io.close_consumer), and this watch is the safety net for any other such wedge. Nothing in the client
notices (its heartbeats succeed), so the daemon watches for it: no partition of the requests topic assigned to
this member for `kafka.unassigned_rejoin_s`, while records wait past the group's committed offsets and those
offsets have not moved over that time (so a replica that is idle because the group has more members than
partitions, and the others are working, stays as it is). Then the daemon closes its clients and joins with a new
consumer (daemon/app.py), counted in `unlearnd_group_rejoins_total`. A member still rebalancing counts as
unassigned too: a rebalance that never ends is the same stall.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, TopicPartition

from daemon.liveness import BrokerLost

log = logging.getLogger("unlearnd")


class GroupStalled(BrokerLost):
    """This member held no partition for too long while requests waited: rejoin with a new consumer."""


class UnassignedWatch:
    def __init__(self, topic: str, rejoin_after_s: float):
        self.topic = topic
        self.rejoin_after_s = rejoin_after_s
        self._since: float | None = None  # when this member last stopped holding partitions
        self._committed: dict[int, int] | None = None  # the group's committed offsets when the window began

    def check(self, consumer: KafkaConsumer) -> None:
        """Called from the poll loop; raises GroupStalled when the member should rejoin. Cheap unless the member has
        held no partition for a whole window: only then does it ask the cluster about offsets."""
        if self.rejoin_after_s <= 0:
            return
        if consumer.assignment():
            self._since, self._committed = None, None
            return
        now = time.monotonic()
        if self._since is None:
            self._since = now
            return
        half = self.rejoin_after_s / 2  # the offsets are read half-way and at the end: did they move in between?
        if now - self._since < half or (self._committed is not None and now - self._since < self.rejoin_after_s):
            return
        committed, waiting = self._progress(consumer)
        if self._committed is None or waiting == 0 or committed != self._committed:
            # the first look, or nothing waits, or someone is consuming it: look again half a window later
            self._since, self._committed = now - half, committed
            return
        raise GroupStalled(f"no partition of {self.topic} assigned for {now - self._since:.0f}s while {waiting} "
                           "records wait and the group's offsets stand still")

    def _progress(self, consumer: KafkaConsumer) -> tuple[dict[int, int], int]:
        """The group's committed offset per partition of the topic, and how many records lie past them. The end
        offsets may be off on some brokers (Tansu); a wrong count costs at most one needless rejoin per window."""
        partitions = consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        if not tps:
            return {}, 0
        ends = consumer.end_offsets(tps)
        committed = {tp.partition: consumer.committed(tp) or 0 for tp in tps}
        waiting = sum(max(0, (ends.get(tp) or 0) - committed[tp.partition]) for tp in tps)
        return committed, waiting

"""The daemon's consumer-group membership on a real broker.

The unassigned-member watch (daemon/group_watch.py): a member of the group that holds no partition while records wait
and nobody's offsets move is told to rejoin; one that is idle because nothing waits, or because its partner is
consuming, is left alone. Stopping (kafka_io.close_consumer): a member that stops while the group rebalances hands
its partitions on."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from kafka.structs import MemberState

from daemon.broker import EmbeddedBroker
from daemon.group_watch import GroupStalled, UnassignedWatch
from daemon.kafka_io import close_consumer

# Long enough that a partner slowed by a busy machine still commits within half a window (a false stall).
WINDOW_S = 8.0
# How long a member may take to be given partitions: on the embedded broker even a lone first member's join takes
# 3 to 15 s (its coordinator pauses in 3 s steps), with a longer tail on a busy machine.
JOIN_S = 90


def _consumer(bootstrap: str, group: str, topic: str) -> KafkaConsumer:
    # Sticky: the member that holds the one partition keeps it when the second joins. With the default range
    # assignor the partition goes to whichever member id sorts first, so the watched member held it half the time.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000,
                             max_poll_interval_ms=20_000, partition_assignment_strategy=(StickyPartitionAssignor,))
    consumer.subscribe(pattern=f"^{topic}$")
    return consumer


class Owner(threading.Thread):
    """A member that polls (so it stays in the group) and, when `consume` is set, commits what it reads; otherwise
    its partitions stay paused, as a wedged owner's would. It stops as the daemon does (kafka_io.close_consumer)."""

    def __init__(self, bootstrap: str, group: str, topic: str, consume: bool):
        super().__init__(daemon=True)
        self.consumer = _consumer(bootstrap, group, topic)
        self.consume = consume
        self.stop = threading.Event()
        self.holds = threading.Event()
        self.partitions: set[int] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.consume and self.consumer.assignment():
                self.consumer.pause(*self.consumer.assignment())
            if self.consumer.poll(timeout_ms=100) and self.consume:
                self.consumer.commit()
            self.partitions = {tp.partition for tp in self.consumer.assignment()}
            if self.partitions:
                self.holds.set()
        close_consumer(self.consumer, timeout_ms=1000)


@pytest.fixture(scope="module")
def own_broker():
    """A broker of these tests' own: group coordination on the suite's shared broker carries every earlier test's
    groups and topics, and these tests time a group's rebalances."""
    with EmbeddedBroker() as b:
        yield b


def _new_group(broker: EmbeddedBroker, partitions: int) -> tuple[str, str, str]:
    """A new topic with `partitions` and a new group id: (bootstrap, group, topic)."""
    topic, name = f"requests-{uuid.uuid4().hex[:8]}", f"group-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    admin.create_topics([NewTopic(topic, partitions, 1)])
    admin.close()
    return broker.bootstrap_servers, name, topic


@pytest.fixture
def group(own_broker):
    return _new_group(own_broker, 1)


def _publish(bootstrap: str, topic: str, n: int, pause_s: float = 0.0, stop: threading.Event | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(n):
        if stop is not None and stop.is_set():
            break
        producer.send(topic, f"r{i}".encode())
        producer.flush()
        time.sleep(pause_s)
    producer.close()


def _watch_second_member(bootstrap: str, group: str, topic: str, owner: Owner, seconds: float) -> float | None:
    """Poll a second member next to `owner` with the watch for up to `seconds`: when it said rejoin, or None."""
    assert owner.holds.wait(JOIN_S), "the first member never got the partition"
    second = _consumer(bootstrap, group, topic)
    deadline = time.monotonic() + JOIN_S
    while second.group_metadata().state != MemberState.STABLE:  # its join's rebalance is not what is tested
        second.poll(timeout_ms=100)
        assert time.monotonic() < deadline, "the second member never joined"
    assert not second.assignment() and owner.consumer.assignment(), "the first member lost the partition"
    watch, start = UnassignedWatch(topic, WINDOW_S), time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            second.poll(timeout_ms=100)
            try:
                watch.check(second)
            except GroupStalled:
                return time.monotonic() - start
        return None
    finally:
        second.close(autocommit=False)


def test_a_member_given_nothing_while_requests_wait_and_nothing_moves_rejoins(group):
    bootstrap, name, topic = group
    _publish(bootstrap, topic, 3)
    owner = Owner(bootstrap, name, topic, consume=False)
    owner.start()
    try:
        after = _watch_second_member(bootstrap, name, topic, owner, 6 * WINDOW_S)
    finally:
        owner.stop.set()
        owner.join()
    assert after is not None, "the watch never told the unassigned member to rejoin"
    assert after >= WINDOW_S  # never before a whole window


def test_an_idle_member_is_left_alone_when_nothing_waits(group):
    bootstrap, name, topic = group
    owner = Owner(bootstrap, name, topic, consume=True)
    owner.start()
    try:
        assert _watch_second_member(bootstrap, name, topic, owner, 3 * WINDOW_S) is None
    finally:
        owner.stop.set()
        owner.join()


def test_an_idle_member_is_left_alone_while_its_partner_consumes(group):
    bootstrap, name, topic = group
    owner = Owner(bootstrap, name, topic, consume=True)
    owner.start()
    done = threading.Event()
    feeder = threading.Thread(target=_publish, args=(bootstrap, topic, 10_000, 0.2, done), daemon=True)
    feeder.start()
    try:
        assert _watch_second_member(bootstrap, name, topic, owner, 3 * WINDOW_S) is None
    finally:
        done.set()
        feeder.join()
        owner.stop.set()
        owner.join()


def test_a_member_that_stops_while_the_group_rebalances_hands_its_partitions_on(own_broker):
    # The group's first member leads it. It stops just after a third member asked to join, while the group
    # rebalances: on Tansu 0.6.0 a LeaveGroup sent then left the departed member recorded as the group's leader,
    # and no member was given a partition again (the replicas benchmark's stall). Closed without leaving, it is
    # expired after session_timeout_ms and the others share its partitions.
    bootstrap, name, topic = _new_group(own_broker, 4)
    leader, other, newcomer = (Owner(bootstrap, name, topic, consume=True) for _ in range(3))
    leader.start()
    assert leader.holds.wait(JOIN_S), "the first member never got partitions"
    other.start()
    assert other.holds.wait(JOIN_S), "the second member never got partitions"
    time.sleep(2)
    newcomer.start()
    time.sleep(0.5)
    leader.stop.set()
    leader.join()
    try:
        deadline = time.monotonic() + JOIN_S
        while not (newcomer.partitions and other.partitions | newcomer.partitions == {0, 1, 2, 3}
                   and not other.partitions & newcomer.partitions):
            assert time.monotonic() < deadline, (f"after the leader stopped: {sorted(other.partitions)} and "
                                                 f"{sorted(newcomer.partitions)} held of 4 partitions")
            time.sleep(0.5)
    finally:
        for member in (other, newcomer):
            member.stop.set()
            member.join()

"""The broker goes away and comes back: the daemon says so (log, metric) and resumes by itself."""

from __future__ import annotations

import os
import signal
import time

from kafka import KafkaAdminClient

from daemon.broker import EmbeddedBroker, free_port
from tests.harness import Stack, request


def test_daemon_survives_broker_restart(tmp_path, bootstrapped_state):
    port = free_port()
    broker = EmbeddedBroker(port).start()
    stack = Stack(tmp_path, broker.bootstrap_servers, bootstrapped_state)
    try:
        proc = stack.start()
        stack.publish(request("before-outage", sample_ids=[1]))
        assert stack.results(1)[0]["status"] == "applied"

        broker.stop()
        # Our own producer must not be the first to ask the new broker for the requests topic: its metadata
        # refresh would auto-create the topic with the broker's default partitions before the daemon can.
        stack._producer.close()
        stack.wait_metric("unlearnd_broker_connected", 0.0, timeout=30)
        deadline = time.monotonic() + 10  # the metric drops at once; the loop says so when it next looks
        while "broker unavailable" not in stack.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "broker unavailable" in stack.log()
        assert proc.poll() is None

        # Tansu is memory-only: the new broker starts empty, like a wiped cluster. The daemon must recreate
        # its topics and a fresh (idempotent) producer, rejoin, and carry on.
        broker = EmbeddedBroker(port).start()
        stack.wait_metric("unlearnd_broker_connected", 1.0, timeout=60)
        assert stack.metric("unlearnd_broker_disconnects_total") == 1  # one outage, however many reconnects failed
        from kafka import KafkaProducer

        stack._producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
        stack.publish(request("after-outage", sample_ids=[2]))
        [result] = stack.results(1, request_id="after-outage", timeout=90)
        assert result["status"] == "applied" and result["version"] == "v0002"
        # The daemon re-created its topics with the configured partitions (2 in the test config) before anything
        # else could create them with the broker's defaults (4 on Tansu).
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        try:
            parts = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(None)}
        finally:
            admin.close()
        assert parts[stack.topic("requests")] == 2 and parts[stack.topic("results")] == 2
    finally:
        stack.close()
        broker.stop()


def test_a_frozen_broker_is_detected(tmp_path, bootstrapped_state):
    """SIGSTOP: the broker still accepts TCP connections but answers nothing. The daemon must say so (metric 0)
    and carry on when it thaws."""
    broker = EmbeddedBroker(free_port()).start()
    stack = Stack(tmp_path, broker.bootstrap_servers, bootstrapped_state)
    try:
        proc = stack.start()
        os.kill(broker.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            stack.wait_metric("unlearnd_broker_connected", 0.0, timeout=40, proc=proc)
            detected_s = time.monotonic() - started
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        assert detected_s < 30, detected_s
        stack.wait_metric("unlearnd_broker_connected", 1.0, timeout=90, proc=proc)
        stack.publish(request("after-freeze", sample_ids=[3]))
        assert stack.results(1, request_id="after-freeze", timeout=90)[0]["status"] == "applied"
    finally:
        stack.close()
        broker.stop()


def test_a_killed_embedded_broker_is_started_again(tmp_path, bootstrapped_state):
    """The embedded broker is the daemon's child: killed, it is started again (memory-only: it comes back empty)
    and the daemon carries on, instead of waiting forever for a process that is gone."""
    from kafka import KafkaProducer

    port = free_port()
    with EmbeddedBroker(port):  # only for the harness's own producer, made with the stack; the daemon brings its own
        stack = Stack(tmp_path, f"127.0.0.1:{port}", bootstrapped_state)
    try:
        proc = stack.start(UNLEARND__KAFKA__BOOTSTRAP_SERVERS="embedded", UNLEARND__KAFKA__EMBEDDED_PORT=str(port))
        [broker_pid] = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _parent_of(int(pid)) == proc.pid]
        os.kill(broker_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "started it again" not in stack.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "the embedded broker exited (code -9); started it again" in stack.log()
        stack.wait_metric("unlearnd_broker_connected", 1.0, timeout=60, proc=proc)
        stack._producer.close()
        stack._producer = KafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
        stack.publish(request("after-revival", sample_ids=[4]))
        assert stack.results(1, request_id="after-revival", timeout=90)[0]["status"] == "applied"
    finally:
        stack.close()


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_embedded_broker_does_not_outlive_a_killed_daemon():
    """`make run` after a crash must find the port free: the embedded broker dies with its parent, even on SIGKILL."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("from daemon.broker import EmbeddedBroker; import time; b = EmbeddedBroker().start(); "
            "print(b.process.pid, b.port, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    broker_pid, port = map(int, parent.stdout.readline().split())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    from daemon.broker import port_open

    while time.monotonic() < deadline and (os.path.exists(f"/proc/{broker_pid}") or port_open(port)):
        time.sleep(0.2)
    assert not port_open(port), "the broker outlived its daemon and still holds the port"

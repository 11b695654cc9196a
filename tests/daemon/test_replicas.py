"""One state directory, one daemon; and several replicas never apply one request twice."""

from __future__ import annotations

import json

from daemon.state_lock import StateLock
from tests.harness import TEST_MODEL, request


def test_a_second_daemon_on_one_state_refuses_to_start(stack):
    """Two daemons on one ledger fork the version chain: the second one stops at once with one clear line."""
    first = stack.start()
    second = stack.start(wait_ready=False)
    assert second.wait(60) == 1
    lines = [line for line in stack.log().splitlines() if line.startswith("unlearnd:")]
    assert len(lines) == 1 and "Traceback" not in stack.log(), stack.log()
    assert "in use by another unlearnd daemon" in lines[0] and f"pid {first.pid}" in lines[0]
    assert first.poll() is None
    stack.publish(request("still-one", sample_ids=[1]))
    assert stack.results(1, request_id="still-one")[0]["status"] == "applied"


def test_the_lock_dies_with_its_holder(tmp_path):
    """flock: a SIGKILLed daemon leaves no stale lock behind (the kernel releases it)."""
    import subprocess
    import sys

    ledger = tmp_path / "ledger.sqlite3"
    holder = subprocess.Popen([sys.executable, "-c", f"from daemon.state_lock import StateLock; import time; "
                               f"StateLock({str(ledger)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    StateLock(ledger).acquire().release()


def test_unkeyed_requests_are_applied_once_by_two_replicas(stack, bootstrapped_state):
    """Two replicas in one group, each with its own ledger, and producers that do not key by model: every request
    is re-published keyed by its model and applied by that partition's owner only."""
    other, other_port = stack.replica("b", bootstrapped_state)
    stack.start()
    stack.start(wait_ready=False, config=other)
    stack.wait_metric("unlearnd_broker_connected", 1.0, timeout=60, port=other_port)
    ids = [f"unkeyed-{i}" for i in range(16)]
    for i, rid in enumerate(ids):
        stack.publish(request(rid, sample_ids=[500 + i]), key=None)
    results = stack.results(len(ids), timeout=120)
    assert {r["request_id"] for r in results} == set(ids) and all(r["status"] == "applied" for r in results)

    from daemon.ledger import Ledger

    ledgers = [stack.ledger(), Ledger(stack.root / "var-b" / "ledger.sqlite3")]
    applied_by = {rid: [i for i, led in enumerate(ledgers) if (row := led.get_request(rid)) and
                        row.status == "applied"] for rid in ids}
    assert all(len(owners) == 1 for owners in applied_by.values()), applied_by
    # All of one model's requests were applied on one replica: its partition's owner.
    assert len({owners[0] for owners in applied_by.values()}) == 1
    rekeyed = stack.read("requests", len(ids) * 2, where=lambda r: r.key == TEST_MODEL.encode())
    assert {json.loads(r.value)["request_id"] for r in rekeyed} == set(ids)
    assert all(dict(r.headers).get("unlearnd.rekeyed_from") for r in rekeyed)

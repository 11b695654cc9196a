"""A crash at any step of a request never loses it and never applies it twice.

The daemon is SIGKILLed at each named step (daemon/failpoints.py), then restarted without the failpoint; the
request must end applied exactly once: one new version, its samples forgotten once, results agreeing.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.harness import TEST_MODEL, request


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("point", ["before_engine", "after_artifact", "after_ledger", "before_offset_commit"])
def test_killed_mid_request_then_restarted_applies_exactly_once(stack, point):
    crashing = stack.start(UNLEARND_FAILPOINT=point)
    stack.publish(request("crash-1", sample_ids=[20, 21, 22]))
    assert crashing.wait(60) == -signal.SIGKILL, stack.log()

    stack.start()
    results = stack.results(1, request_id="crash-1")
    assert results[0]["status"] == "applied" and results[0]["version"] == "v0001"

    # Nothing applied twice, whatever the step: one new version, one forget record per sample.
    ledger = stack.ledger()
    assert [a.id for a in ledger.list_artifacts(TEST_MODEL, "version")] == ["v0000", "v0001"]
    assert ledger.forgotten_ids(TEST_MODEL, "v0001") == frozenset({20, 21, 22})
    row = ledger.get_request("crash-1")
    assert row.status == "applied"
    # Before the ledger committed, the restart re-ran the engine (attempt 2); after, it answered from the ledger.
    assert row.attempts == (2 if point in ("before_engine", "after_artifact") else 1)
    # A later request still builds on the right parent.
    stack.publish(request("after-crash", sample_ids=[30]))
    [later] = stack.results(1, request_id="after-crash")
    assert later["version"] == "v0002" and ledger.get_artifact(TEST_MODEL, "v0002").parent == "v0001"


def test_outside_sigkill_while_engine_runs(stack):
    """The literal case: an operator's (or the OOM killer's) SIGKILL while the request is in the engine."""
    hanging = stack.start(UNLEARND_FAILPOINT="before_engine:hang")
    stack.publish(request("oom-1", sample_ids=[60, 61]))
    _wait_for(lambda: "failpoint before_engine: hanging" in stack.log(), 60, "the request to reach the engine")
    assert stack.ledger().get_request("oom-1").status == "processing"
    hanging.kill()
    hanging.wait(10)

    stack.start()
    [result] = stack.results(1, request_id="oom-1")
    assert result["status"] == "applied"
    assert len(stack.ledger().list_artifacts(TEST_MODEL, "version")) == 2


def test_outside_kills_never_fail_a_request(stack):
    """Deploys and OOM kills of the daemon are not the request's fault: killed three times with it in hand (more
    than max_attempts = 2 in the test config), it is still applied, and no engine failure is counted."""
    for _ in range(3):
        killed = stack.start(wait_ready=False, UNLEARND_FAILPOINT="before_engine")
        if len(stack.procs) == 1:
            stack.publish(request("kept", sample_ids=[70]))
        assert killed.wait(90) == -signal.SIGKILL, stack.log()
    stack.start()
    [result] = stack.results(1, request_id="kept", timeout=90)
    assert result["status"] == "applied"
    row = stack.ledger().get_request("kept")
    assert (row.status, row.engine_failures) == ("applied", 0) and row.attempts >= 4
    assert "isolated: it was in hand at a crash" in stack.log()  # the suspect ran in a child process


def test_a_request_that_kills_the_engine_ends_failed_and_can_be_retried(stack):
    """Poison pill: the engine itself dies on the request (here a failpoint SIGKILLs whatever process runs it).
    The first death takes the daemon; then the request runs in a child process, whose deaths are counted, and
    after max_attempts (2) it is failed and dead-lettered while the daemon stays up. After the operator's fix,
    `unlearnd requests retry` re-admits it from its dead-letter copy and it applies."""
    first = stack.start(UNLEARND_FAILPOINT="in_engine")
    stack.publish(request("poison", sample_ids=[71]))
    assert first.wait(60) == -signal.SIGKILL
    second = stack.start(wait_ready=False, UNLEARND_FAILPOINT="in_engine")
    [result] = stack.results(1, request_id="poison", timeout=120)
    assert result["status"] == "failed" and result["reason"] == "engine_failed"
    assert "killed by SIGKILL" in result["error"]
    [dead] = stack.read("dlq", 1)
    assert json.loads(dead.value)["request_id"] == "poison"
    assert second.poll() is None  # the daemon survived its engine's deaths
    assert stack.ledger().get_request("poison").engine_failures == 2
    stack.wait_metric("unlearnd_isolated_runs_total", 2.0, outcome="engine_died")

    second.terminate()
    assert second.wait(30) == 0
    out = json.loads(stack.cli("requests", "retry", "poison", "--reason", "fixed the engine", "--json").stdout)
    assert out == {"request_id": "poison", "status": "readmitted", "republished": True}
    stack.start()
    results = stack.results(2, request_id="poison", timeout=120)
    assert [r["status"] for r in results] == ["failed", "applied"]
    row = stack.ledger().get_request("poison")
    assert (row.status, row.artifact_id) == ("applied", "v0001")
    assert stack.ledger().forgotten_ids(TEST_MODEL, "v0001") == frozenset({71})
    again = stack.cli("requests", "retry", "poison", check=False)
    assert again.returncode == 1 and "applied, not failed" in again.stderr  # one line, no traceback


def test_sigterm_during_the_group_join_then_the_next_daemon_processes_within_30s(stack):
    """A daemon stopped while its JoinGroup is in flight must not leave the group waiting for a ghost leader (the
    next instance processed nothing for minutes before)."""
    first = stack.start(wait_ready=False)
    _wait_for(lambda: "connected to" in stack.log(), 60, "the first daemon to connect")
    first.send_signal(signal.SIGTERM)  # its first poll, and so its group join, is under way now
    assert first.wait(60) == 0
    started = time.monotonic()
    stack.start(wait_ready=False)
    stack.publish(request("after-join", sample_ids=[80]))
    [result] = stack.results(1, request_id="after-join", timeout=120)
    assert result["status"] == "applied"
    assert time.monotonic() - started < 30


def test_a_redelivery_after_repeated_kills_is_not_answered_again(stack):
    """Killed after its answers were flushed but before the offsets were committed, again and again: each restart
    is redelivered the same records and must not answer them again (up to 24 results per request before)."""
    ids = [f"redeliver-{i}" for i in range(6)]
    for i, rid in enumerate(ids):
        stack.publish(request(rid, sample_ids=[90 + i]))
    for _ in range(3):
        killed = stack.start(wait_ready=False, UNLEARND_FAILPOINT="before_offset_commit")
        assert killed.wait(90) == -signal.SIGKILL, stack.log()
    stack.start()
    stack.wait_metric("unlearnd_redelivered_total", float(len(ids)), timeout=60)
    results = stack.results(100, timeout=10)
    assert sorted(r["request_id"] for r in results) == sorted(ids)  # exactly one answer each
    assert all(r["status"] == "applied" for r in results)

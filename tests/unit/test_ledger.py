"""The ledger's state machine on a real SQLite file: request statuses, artifacts and heads, what it refuses."""

from __future__ import annotations

import pytest

from daemon.ledger import HeadMoved, Ledger, read_adapters

M = "m"


@pytest.fixture
def ledger(tmp_path):
    db = Ledger(tmp_path / "ledger.sqlite3")
    yield db
    db.close()


def _begin(ledger: Ledger, rid: str = "r1") -> int:
    return ledger.begin_attempt(rid, model=M, method="iau", subject="s", body_sha256="h", forget_kind="sample_ids",
                                forget_count=2, source="t/0/5")


def _version(ledger: Ledger, parent: str | None = None, request_id: str | None = "r1", forgotten=()) -> str:
    vid = ledger.next_id(M, "version")
    ledger.add_artifact(M, vid, "version", parent=parent, request_id=request_id, path=f"/a/{vid}", sha256="x",
                        forgotten_ids=forgotten)
    return vid


def _event_kinds(ledger: Ledger) -> list[str]:
    return [e["kind"] for e in reversed(ledger.events())]


def test_attempts_count_up_and_a_new_attempt_clears_the_last_error(ledger):
    assert ledger.get_request("r1") is None
    assert _begin(ledger) == 1
    row = ledger.get_request("r1")
    assert (row.status, row.attempts, row.engine_failures, row.model, row.forget_count) == ("processing", 1, 0, M, 2)
    assert ledger.record_engine_failure("r1", "boom") == 1
    assert ledger.get_request("r1").error == "boom"
    assert _begin(ledger) == 2
    row = ledger.get_request("r1")
    assert (row.status, row.attempts, row.engine_failures, row.error) == ("processing", 2, 1, None)


@pytest.mark.parametrize("status", ["applied", "rejected", "failed"])
def test_finish_records_a_terminal_status_and_its_audit_event(ledger, status):
    _begin(ledger)
    ledger.finish("r1", status, artifact_id="v0001" if status == "applied" else None, metrics={"acc": 0.5},
                  reason=None if status == "applied" else "schema", duration_s=1.5)
    row = ledger.get_request("r1")
    assert (row.status, row.metrics, row.duration_s, row.model) == (status, {"acc": 0.5}, 1.5, M)
    assert row.completed_at is not None and row.attempts == 1  # the attempt count survives the outcome
    assert _event_kinds(ledger) == [status]


def test_finish_without_an_attempt_creates_the_row(ledger):
    """A request rejected before it was ever attempted (bad body, unknown model) still has its row."""
    ledger.finish("never-tried", "rejected", reason="unknown_model", error="no such model")
    row = ledger.get_request("never-tried")
    assert (row.status, row.attempts, row.reason) == ("rejected", 0, "unknown_model")


def test_finish_refuses_a_non_terminal_status(ledger):
    _begin(ledger)
    with pytest.raises(AssertionError):
        ledger.finish("r1", "processing")
    assert ledger.get_request("r1").status == "processing"


def test_only_a_failed_request_is_readmitted_and_then_gets_a_fresh_failure_budget(ledger):
    _begin(ledger)
    with pytest.raises(ValueError, match="processing, not failed"):
        ledger.readmit("r1", reason="op")
    with pytest.raises(ValueError, match="unknown, not failed"):
        ledger.readmit("nope", reason="op")
    ledger.record_engine_failure("r1", "boom")
    ledger.finish("r1", "failed", reason="engine_error")
    row = ledger.readmit("r1", reason="fixed the cause")
    assert (row.status, row.engine_failures) == ("readmitted", 0)
    with pytest.raises(ValueError, match="readmitted, not failed"):  # readmitting twice is refused, not repeated
        ledger.readmit("r1", reason="again")
    assert _begin(ledger) == 2 and ledger.get_request("r1").status == "processing"
    assert _event_kinds(ledger) == ["failed", "readmitted"]


def test_an_applied_request_and_its_artifact_commit_together_or_not_at_all(ledger):
    _begin(ledger)
    with pytest.raises(RuntimeError):
        with ledger.transaction():
            _version(ledger)
            ledger.finish("r1", "applied", artifact_id="v0000")
            raise RuntimeError("crash between the two writes")
    assert ledger.head(M) is None and ledger.get_request("r1").status == "processing"
    assert ledger.next_id(M, "version") == "v0000"  # the id is handed out again: retries are deterministic
    with ledger.transaction():
        vid = _version(ledger)
        ledger.finish("r1", "applied", artifact_id=vid)
    assert ledger.head(M).id == "v0000" and ledger.get_request("r1").artifact_id == "v0000"


def test_a_new_version_becomes_the_head_and_rollback_restores_an_earlier_one(ledger):
    v0 = _version(ledger, request_id=None, forgotten=())
    v1 = _version(ledger, parent=v0, request_id="r1", forgotten=(3, 5))
    v2 = _version(ledger, parent=v1, request_id="r2", forgotten=(7,))
    assert (v0, v1, v2) == ("v0000", "v0001", "v0002")
    assert ledger.head(M).id == v2 and ledger.count_artifacts(M, "version", active_only=True) == 1
    assert [a.id for a in ledger.lineage(M, v2)] == [v2, v1, v0]
    assert ledger.forgotten_ids(M, v2) == {3, 5, 7}
    row = ledger.set_head(M, v0, reason="audit")
    assert row.active and ledger.head(M).id == v0
    assert ledger.forgotten_ids(M, v0) == frozenset()  # the later versions' forgetting is undone with them
    assert ledger.next_id(M, "version") == "v0003"  # ids are never reused, even after a rollback
    assert ledger.events(M, limit=1)[0]["detail"] == {"from": v2, "reason": "audit"}
    assert _event_kinds(ledger) == ["registered", "published", "published", "rolled_back"]


def test_rollback_refuses_what_is_not_a_version(ledger):
    _version(ledger)
    ledger.add_artifact(M, "a0000", "adapter", parent=None, request_id="r9", path="/a/a0000", sha256="x")
    for bad in ("v0099", "a0000"):
        with pytest.raises(KeyError):
            ledger.set_head(M, bad, reason="x")
    assert ledger.head(M).id == "v0000"


def test_an_artifact_id_is_recorded_once(ledger):
    _version(ledger)
    with pytest.raises(HeadMoved):  # the id is taken (built on the head or not): the transaction keeps nothing
        ledger.add_artifact(M, "v0000", "version", parent="v0000", request_id="r2", path="/b", sha256="y")
    assert ledger.get_artifact(M, "v0000").path == "/a/v0000" and ledger.head(M).id == "v0000"


def test_adapters_switch_on_and_off_without_touching_each_other_or_the_head(ledger, tmp_path):
    _version(ledger)
    for rid in ("r1", "r2"):
        ledger.add_artifact(M, ledger.next_id(M, "adapter"), "adapter", parent=None, request_id=rid,
                            path=f"/a/{rid}", sha256="x")
    assert ledger.set_adapter_active(M, "a0000", False, reason="undo").active is False
    assert [(a.id, a.active) for a in read_adapters(tmp_path / "ledger.sqlite3", M)] == [("a0000", False),
                                                                                          ("a0001", True)]
    assert ledger.set_adapter_active(M, "a0000", True, reason="redo").active is True
    assert ledger.head(M).id == "v0000"
    with pytest.raises(KeyError):
        ledger.set_adapter_active(M, "v0000", False, reason="a version is no adapter")
    assert _event_kinds(ledger)[-2:] == ["rolled_back", "restored"]


def test_an_applied_request_is_rolled_back_while_its_artifact_is_not_served(ledger):
    """A version out of the head's lineage, or an adapter switched off: the request's change is not served."""
    v0 = _version(ledger, request_id=None)
    v1 = _version(ledger, parent=v0, request_id="r1")
    ledger.add_artifact(M, "a0000", "adapter", parent=None, request_id="r2", path="/a/a0000", sha256="x")
    for rid, artifact in (("r1", v1), ("r2", "a0000")):
        _begin(ledger, rid)
        ledger.finish(rid, "applied", artifact_id=artifact)
    _begin(ledger, "r3")
    ledger.finish("r3", "failed", error="boom")
    rows = {rid: ledger.get_request(rid) for rid in ("r1", "r2", "r3")}
    assert not any(ledger.rolled_back(r) for r in rows.values())
    assert ledger.served_artifacts(M) == {v0, v1, "a0000"}
    ledger.set_head(M, v0, reason="undo")
    ledger.set_adapter_active(M, "a0000", False, reason="undo")
    assert [ledger.rolled_back(rows[rid]) for rid in ("r1", "r2", "r3")] == [True, True, False]
    ledger.set_head(M, v1, reason="redo")  # forward again: v1 is served, and so is what r1 applied
    v2 = _version(ledger, parent=v1, request_id=None)
    assert ledger.head(M).id == v2 and not ledger.rolled_back(rows["r1"]) and ledger.rolled_back(rows["r2"])


def test_an_unreachable_postgres_ledger_says_where_and_why(monkeypatch):
    from daemon import ledger_backends

    monkeypatch.setattr(ledger_backends, "POOL_OPEN_S", 1.0)  # the wait a daemon gives a database starting beside it
    with pytest.raises(ledger_backends.LedgerUnreachable, match=r"postgresql://u@127.0.0.1:1/x within 1 s \(.+\)"):
        Ledger(ledger_backends.PostgresTarget("postgresql://u@127.0.0.1:1/x"))


def test_answered_marks_are_kept_until_their_offsets_are_committed(ledger):
    ledger.mark_answered([("t", 0, 5, "f5"), ("t", 0, 6, "f6"), ("t", 1, 5, "g5")])
    ledger.mark_answered([("t", 0, 6, "f6")])  # marking again is harmless
    assert ledger.answered_between("t", 0, 0, 10) == {5: "f5", 6: "f6"}
    ledger.forget_answered({("t", 0): 6})
    assert ledger.answered_between("t", 0, 0, 10) == {6: "f6"}
    assert ledger.answered_between("t", 1, 0, 10) == {5: "g5"}


def test_the_ledger_survives_a_reopen(tmp_path):
    first = Ledger(tmp_path / "l.sqlite3")
    _begin(first)
    first.finish("r1", "applied", artifact_id="v0000")
    first.close()
    again = Ledger(tmp_path / "l.sqlite3")
    try:
        assert again.get_request("r1").status == "applied"
    finally:
        again.close()
    with pytest.raises(FileNotFoundError):
        read_adapters(tmp_path / "missing.sqlite3", M)

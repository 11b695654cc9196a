"""The ledger's contract, on both backends: the embedded SQLite file and a real PostgreSQL server (issue 17).

Every test runs twice (`ledger_location` in tests/conftest.py): what the daemon relies on must hold whichever
backend a deployment picks.
"""

from __future__ import annotations

import sqlite3

import pytest

from daemon.ledger import AppliedElsewhere, HeadMoved, Ledger
from daemon.ledger_schema import MIGRATIONS

MODEL = "m"


@pytest.fixture
def ledger(ledger_location):
    led = Ledger(ledger_location)
    yield led
    led.close()


def _attempt(ledger: Ledger, rid: str, body: str = "h") -> int:
    return ledger.begin_attempt(rid, model=MODEL, method="iau", subject="user-1", body_sha256=body,
                                forget_kind="sample_ids", forget_count=2, source="t/0/7")


def _version(ledger: Ledger, vid: str, parent: str | None, rid: str | None = None, forgotten=()) -> None:
    ledger.add_artifact(MODEL, vid, "version", parent=parent, request_id=rid, path=f"/store/{vid}",
                        sha256=f"sha-{vid}", metrics={"test_acc": 0.9}, info={"spec": {"arch": "mlp"}},
                        forgotten_ids=forgotten)


def test_a_request_moves_through_its_states(ledger):
    assert _attempt(ledger, "r1") == 1 and _attempt(ledger, "r1") == 2
    assert ledger.record_engine_failure("r1", "boom") == 1
    ledger.finish("r1", "failed", reason="engine_failed", error="boom")
    row = ledger.get_request("r1")
    assert (row.status, row.attempts, row.engine_failures, row.subject, row.source) == \
           ("failed", 2, 1, "user-1", "t/0/7")
    with pytest.raises(AppliedElsewhere):  # a finished request is not reopened by a late attempt
        _attempt(ledger, "r1")
    assert ledger.readmit("r1", reason="fixed").status == "readmitted"
    assert _attempt(ledger, "r1") == 3 and ledger.get_request("r1").engine_failures == 0
    with pytest.raises(ValueError):
        ledger.readmit("r1", reason="not failed")
    assert [e["kind"] for e in ledger.events(limit=10)][:2] == ["readmitted", "failed"]


def test_versions_form_a_chain_and_roll_back(ledger):
    _version(ledger, "v0000", None)
    _attempt(ledger, "r1")
    with ledger.transaction():
        ledger.claim_unapplied(["r1"])
        _version(ledger, "v0001", "v0000", "r1", forgotten=(3, 4))
        ledger.finish("r1", "applied", model=MODEL, artifact_id="v0001", metrics={"forgotten": 2.0}, duration_s=0.5)
    head = ledger.head(MODEL)
    assert (head.id, head.parent, head.metrics, head.info) == ("v0001", "v0000", {"test_acc": 0.9},
                                                              {"spec": {"arch": "mlp"}})
    assert [a.id for a in ledger.lineage(MODEL, "v0001")] == ["v0001", "v0000"]
    assert ledger.forgotten_ids(MODEL, "v0001") == {3, 4} and ledger.forgotten_ids(MODEL, "v0000") == set()
    assert ledger.count_artifacts(MODEL, "version") == 2 and ledger.next_id(MODEL, "version") == "v0002"
    assert ledger.get_request("r1").metrics == {"forgotten": 2.0}
    ledger.set_head(MODEL, "v0000", reason="test")
    assert ledger.head(MODEL).id == "v0000" and not ledger.get_artifact(MODEL, "v0001").active
    assert ledger.events_after(0, ("rolled_back",))[0]["artifact_id"] == "v0000"
    with pytest.raises(KeyError):
        ledger.set_head(MODEL, "v0404", reason="test")


def test_adapters_switch_on_and_off(ledger):
    ledger.add_artifact(MODEL, "a0000", "adapter", parent=None, request_id="r1", path="/a", sha256="s")
    ledger.add_artifact(MODEL, "a0001", "adapter", parent=None, request_id="r2", path="/b", sha256="s")
    assert ledger.count_artifacts(MODEL, "adapter", active_only=True) == 2  # adapters do not displace each other
    ledger.set_adapter_active(MODEL, "a0000", False, reason="test")
    assert [a.active for a in ledger.list_artifacts(MODEL, "adapter")] == [False, True]
    assert ledger.find_artifact("a0001").path == "/b"


def test_the_head_moves_only_from_the_parent_it_was_built_on(ledger):
    _version(ledger, "v0000", None)
    _version(ledger, "v0001", "v0000")
    with pytest.raises(HeadMoved):  # built on v0000, but the head is v0001: a fork, refused
        _version(ledger, "v0002", "v0000", "r9", forgotten=(1,))
    with pytest.raises(HeadMoved):  # a second first version
        _version(ledger, "v0002", None)
    with pytest.raises(HeadMoved):  # an id another writer took
        _version(ledger, "v0001", "v0001")
    assert ledger.get_artifact(MODEL, "v0002") is None and ledger.head(MODEL).id == "v0001"
    assert ledger.forgotten_ids(MODEL, "v0001") == set()  # nothing of the refused transactions was kept


def test_an_applied_request_is_never_claimed_or_rewritten_again(ledger):
    _attempt(ledger, "r1")
    ledger.finish("r1", "applied", model=MODEL, artifact_id="v0001")
    with pytest.raises(AppliedElsewhere):
        ledger.claim_unapplied(["r2", "r1"])
    ledger.finish("r1", "rejected", reason="late")  # a late writer's outcome is not kept
    assert (ledger.get_request("r1").status, ledger.get_request("r1").artifact_id) == ("applied", "v0001")


def test_a_failed_request_is_never_made_rejected_but_may_still_be_applied(ledger):
    """A rejection written under a failed request's id is another message's (one reusing the id): not its outcome.
    A retry that succeeds is."""
    _attempt(ledger, "r1")
    ledger.finish("r1", "failed", model=MODEL, reason="engine_failed", error="boom")
    ledger.finish("r1", "rejected", reason="schema")
    assert (ledger.get_request("r1").status, ledger.get_request("r1").reason) == ("failed", "engine_failed")
    ledger.finish("r1", "applied", model=MODEL, artifact_id="v0001")
    assert ledger.get_request("r1").status == "applied"


def test_answered_marks(ledger):
    ledger.mark_answered([("t", 0, 5, "f1"), ("t", 0, 6, "f2"), ("t", 1, 5, "x")])
    ledger.mark_answered([("t", 0, 6, "f3")])
    assert ledger.answered_between("t", 0, 0, 10) == {5: "f1", 6: "f3"}
    ledger.forget_answered({("t", 0): 6})
    assert ledger.answered_between("t", 0, 0, 2**40) == {6: "f3"}  # offsets are 64-bit on both backends


def test_requests_are_listed_newest_first(ledger):
    for rid in ("a", "b", "c"):
        _attempt(ledger, rid)
    ledger.finish("b", "rejected", reason="schema")
    assert [r.request_id for r in ledger.list_requests()] == ["c", "b", "a"]
    assert [r.request_id for r in ledger.list_requests(status="rejected")] == ["b"]
    ledger.record_rejection("undecodable_record", "t/0/9")
    assert ledger.events(limit=1)[0]["detail"] == {"reason": "undecodable_record", "source": "t/0/9"}


def test_migrations_are_recorded_and_run_once(ledger_location):
    first = Ledger(ledger_location)
    rows = first.read_rows("SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in rows] == [m.version for m in MIGRATIONS]
    _version(first, "v0000", None)
    first.close()
    again = Ledger(ledger_location)  # a restart: nothing re-run, nothing lost
    assert len(again.read_rows("SELECT version FROM schema_migrations")) == len(MIGRATIONS)
    assert again.head(MODEL).id == "v0000"
    again.close()


def test_artifact_ids(ledger):
    if ledger.shared:  # handed out once each, whoever asks: replicas never write into one directory
        ids = [ledger.allocate_id(MODEL, "version") for _ in range(3)]
        assert ids == ["v0000", "v0001", "v0002"]
    else:  # one writer: the count of rows, the same again on a retry after a crash
        assert ledger.allocate_id(MODEL, "version") == ledger.allocate_id(MODEL, "version") == "v0000"


def test_a_ledger_from_before_migrations_is_brought_forward(tmp_path):
    """A SQLite ledger written by a release without `schema_migrations` (and without engine_failures) opens with
    its rows intact."""
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0].sql)
        db.execute("INSERT INTO requests (request_id, status, attempts, received_at) VALUES ('old', 'applied', 1, 1)")
    ledger = Ledger(path)
    row = ledger.get_request("old")
    assert (row.status, row.engine_failures) == ("applied", 0)
    assert len(ledger.read_rows("SELECT version FROM schema_migrations")) == len(MIGRATIONS)
    ledger.close()


def test_a_ledger_is_copied_whole(ledger_location, tmp_path):
    """An SQLite ledger moved into another (e.g. the PostgreSQL several replicas will share) keeps its rows, its
    chain and its audit trail, and the audit trail goes on after the copied events."""
    from daemon.ledger_copy import copy_ledger

    source = Ledger(tmp_path / "source.sqlite3")
    _version(source, "v0000", None)
    _attempt(source, "r1")
    _version(source, "v0001", "v0000", "r1", forgotten=(7,))
    source.finish("r1", "applied", model=MODEL, artifact_id="v0001")
    target = Ledger(ledger_location)
    assert copy_ledger(source, target) == {"requests": 1, "artifacts": 2, "forgotten": 1, "events": 3}
    assert target.head(MODEL).id == "v0001" and target.forgotten_ids(MODEL, "v0001") == {7}
    assert target.get_request("r1").status == "applied"
    target.record_rejection("schema", "t/0/1")
    assert [e["seq"] for e in target.events(limit=2)] == [4, 3]
    source.close()
    target.close()


def test_serve_reads_the_adapters_of_either_backend(ledger_location):
    """`unlearnd serve` reads the active adapters without writing: from the SQLite file, or from PostgreSQL."""
    from daemon.ledger import read_adapters

    ledger = Ledger(ledger_location)
    ledger.add_artifact(MODEL, "a0000", "adapter", parent=None, request_id="r1", path="/a0", sha256="s0")
    ledger.add_artifact(MODEL, "a0001", "adapter", parent=None, request_id="r2", path="/a1", sha256="s1")
    ledger.set_adapter_active(MODEL, "a0000", False, reason="test")
    rows = read_adapters(ledger_location, MODEL)
    assert [(r.id, r.active, r.path) for r in rows] == [("a0000", False, "/a0"), ("a0001", True, "/a1")]
    assert read_adapters(ledger_location, "other") == []
    ledger.close()


def test_the_ledger_url_is_checked_at_load(tmp_path):
    from daemon import config as config_mod
    from daemon.ledger_backends import PostgresTarget, ledger_location

    cfg = config_mod.load(tmp_path / "config.toml", env={
        "UNLEARND__STATE__LEDGER_URL": "postgresql://u@db:5432/l?sslmode=verify-full",
        "UNLEARND__STATE__LEDGER_OPTIONS__SSLROOTCERT": "/tls/ca.crt"})
    target = ledger_location(cfg.state)
    assert isinstance(target, PostgresTarget) and target.options == {"sslrootcert": "/tls/ca.crt"}
    assert "sslmode=verify-full" in target.conninfo() and "sslrootcert=/tls/ca.crt" in target.conninfo()
    assert "secret" not in str(target)
    for bad, why in (("postgresql://u:secret@db/l", "must not hold a password"), ("mysql://db/l", "postgresql://")):
        with pytest.raises(config_mod.ConfigError, match=why):
            config_mod.load(tmp_path / "config.toml", env={"UNLEARND__STATE__LEDGER_URL": bad})
    assert ledger_location(config_mod.load(tmp_path / "config.toml", env={}).state).name == "ledger.sqlite3"

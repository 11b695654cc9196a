"""Two processes race one model's head on a shared PostgreSQL ledger: the chain never forks and no request is
applied twice (issue 17).

Each round, both writers read the head, wait for each other (so both built on the same parent: a real race, not
a hoped-for one), then try to commit the same request as the next version, as the daemon does: claim the request,
move the head from its parent, mark it applied, in one transaction. Exactly one wins each round; the loser sees
HeadMoved or AppliedElsewhere and keeps nothing.
"""

from __future__ import annotations

import multiprocessing

from daemon.ledger import AppliedElsewhere, HeadMoved, Ledger
from daemon.ledger_backends import PostgresTarget

MODEL = "m"
ROUNDS = 12


def _writer(url: str, name: str, barrier, outcomes) -> None:
    ledger = Ledger(PostgresTarget(url))
    try:
        for i in range(ROUNDS):
            rid = f"r{i}"
            parent = ledger.head(MODEL).id
            vid = ledger.allocate_id(MODEL, "version")
            barrier.wait(30)
            try:
                with ledger.transaction():
                    ledger.claim_unapplied([rid])
                    ledger.add_artifact(MODEL, vid, "version", parent=parent, request_id=rid, path=f"/{vid}",
                                        sha256=name, forgotten_ids=(i,))
                    ledger.finish(rid, "applied", model=MODEL, artifact_id=vid)
                outcomes.put((i, name, "won"))
            except (HeadMoved, AppliedElsewhere) as exc:
                outcomes.put((i, name, type(exc).__name__))
            barrier.wait(30)  # both done with round i before either reads the head for round i + 1
    finally:
        ledger.close()


def test_two_processes_racing_one_head_never_fork_it(postgres):
    url = postgres.new_database()
    setup = Ledger(PostgresTarget(url))
    setup.add_artifact(MODEL, setup.allocate_id(MODEL, "version"), "version", parent=None, request_id=None,
                       path="/v0000", sha256="base")
    ctx = multiprocessing.get_context("spawn")
    barrier, outcomes = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, name, barrier, outcomes)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [outcomes.get(timeout=5) for _ in range(2 * ROUNDS)]

    by_round: dict[int, list[str]] = {}
    for i, _name, outcome in results:
        by_round.setdefault(i, []).append(outcome)
    assert all(sorted(o) in (["AppliedElsewhere", "won"], ["HeadMoved", "won"]) for o in by_round.values()), by_round

    versions = setup.list_artifacts(MODEL, "version")
    head = setup.head(MODEL)
    lineage = setup.lineage(MODEL, head.id)
    assert len(versions) == ROUNDS + 1 and len(lineage) == ROUNDS + 1  # one linear chain holds every version
    assert sorted(v.request_id for v in versions if v.request_id) == sorted(f"r{i}" for i in range(ROUNDS))
    assert setup.forgotten_ids(MODEL, head.id) == set(range(ROUNDS))
    assert all(setup.get_request(f"r{i}").status == "applied" for i in range(ROUNDS))
    setup.close()

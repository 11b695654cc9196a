"""Daemons on a shared PostgreSQL ledger (issue 17): real daemon processes, a real broker, a real server.

Two replicas in one group share one ledger and one artifact store. A replica is killed (-9) while requests flow
and its partitions move to the other, which finds the dedupe history and the head where the dead one left them:
every request is applied exactly once, on one unforked chain. The CLI reads the same ledger. When the database
server itself goes away, the daemon pauses (it never fails or drops a request for it) and carries on once the
server is back.
"""

from __future__ import annotations

import json
import subprocess
import time

from daemon.broker import free_port
from daemon.ledger import Ledger
from daemon.ledger_backends import PostgresTarget
from tests.harness import TEST_MODEL, request


def test_two_replicas_share_one_ledger_through_a_kill(stack, postgres_state):
    url = postgres_state
    shared = {"UNLEARND__STATE__LEDGER_URL": url}
    first = stack.start(**shared)
    other_port = free_port()
    second = stack.start(wait_ready=False, UNLEARND__METRICS__PORT=str(other_port), **shared)
    stack.wait_metric("unlearnd_broker_connected", 1.0, timeout=90, proc=second, port=other_port)

    ids = [f"pg-{i}" for i in range(16)]
    samples = {rid: [600 + 2 * i, 601 + 2 * i] for i, rid in enumerate(ids)}
    for i, rid in enumerate(ids[:8]):
        stack.publish(request(rid, sample_ids=samples[rid]), key=None if i % 2 else TEST_MODEL)
    assert len(stack.results(4, timeout=120)) >= 4
    first.kill()  # kill -9: its partitions move to the second replica
    first.wait()
    for i, rid in enumerate(ids[8:]):
        stack.publish(request(rid, sample_ids=samples[rid]), key=None if i % 2 else TEST_MODEL)
    stack.publish(request(ids[0], sample_ids=samples[ids[0]]))  # a re-sent request: answered, not re-applied
    results = stack.results(len(ids) + 1, timeout=180)
    assert {r["request_id"] for r in results} == set(ids) and all(r["status"] == "applied" for r in results)

    ledger = Ledger(PostgresTarget(url))
    head = ledger.head(TEST_MODEL)
    versions = ledger.list_artifacts(TEST_MODEL, "version")
    assert len(ledger.lineage(TEST_MODEL, head.id)) == len(versions)  # one chain, nothing beside it
    lineage = {v.id for v in versions}
    rows = {rid: ledger.get_request(rid) for rid in ids}
    assert all(r.status == "applied" and r.artifact_id in lineage for r in rows.values())
    # Applied once: each sample was forgotten by exactly one version of the chain.
    per_version = [ledger.forgotten_ids(TEST_MODEL, v.id) - ledger.forgotten_ids(TEST_MODEL, v.parent)
                   if v.parent else frozenset() for v in versions]
    wanted = sorted(s for rid in ids for s in samples[rid])
    assert sorted(s for ids_ in per_version for s in ids_) == wanted
    ledger.close()
    listed = _cli_json(stack, shared, "models", "list", "--json")
    assert listed[0]["head"] == head.id and listed[0]["requests"] == len(ids)


def test_losing_the_ledger_server_pauses_the_daemon_and_loses_nothing(stack, own_postgres, bootstrapped_state):
    url = own_postgres.database_from(bootstrapped_state)
    env = {"UNLEARND__STATE__LEDGER_URL": url}
    proc = stack.start(**env)
    stack.publish(request("pgloss-0", sample_ids=[700, 701]))
    assert stack.results(1, timeout=120)[0]["status"] == "applied"

    own_postgres.halt()  # as a crash: no shutdown checkpoint, every connection cut
    for i in (1, 2):
        stack.publish(request(f"pgloss-{i}", sample_ids=[700 + 2 * i, 701 + 2 * i]))
    stack.wait_metric("unlearnd_paused", 1.0, timeout=120, proc=proc, reason="ledger_busy")
    time.sleep(3)  # some retries against the absent server
    assert proc.poll() is None, stack.log()
    assert len(stack.results(2, timeout=2)) == 1  # nothing answered (or failed) while the ledger is away

    own_postgres.resume()
    results = stack.results(3, timeout=180)
    assert sorted(r["request_id"] for r in results) == ["pgloss-0", "pgloss-1", "pgloss-2"]
    assert all(r["status"] == "applied" for r in results), results
    stack.wait_metric("unlearnd_paused", 0.0, timeout=30, proc=proc, reason="ledger_busy")
    assert (stack.metric("unlearnd_transient_errors_total", kind="ledger_busy") or 0) >= 1

    ledger = Ledger(PostgresTarget(url))
    head = ledger.head(TEST_MODEL)
    chain = ledger.lineage(TEST_MODEL, head.id)
    assert len(chain) == len(ledger.list_artifacts(TEST_MODEL, "version"))  # one chain (the two waiting may coalesce)
    in_chain = {v.id for v in chain}
    assert all(ledger.get_request(f"pgloss-{i}").artifact_id in in_chain for i in range(3))
    assert ledger.forgotten_ids(TEST_MODEL, head.id) == frozenset(range(700, 706))
    ledger.close()


def test_ledger_copy_moves_a_single_daemons_ledger_onto_postgres_once(stack, postgres):
    from daemon.state_lock import StateLock
    from tests.harness import REPO, UNLEARND

    url = postgres.new_database()
    source = stack.state / "ledger.sqlite3"
    shared = {"UNLEARND__STATE__LEDGER_URL": url}

    def copy(*args: str):
        return subprocess.run([*UNLEARND, "ledger", "copy", *args], cwd=REPO, env=stack.env(**shared),
                              capture_output=True, text=True, timeout=120)

    lock = StateLock(source).acquire()  # as a running daemon holds it
    refused = copy(str(source))
    lock.release()
    assert refused.returncode == 1 and "in use by another unlearnd daemon" in refused.stderr

    done = copy(str(source), "--json")
    assert done.returncode == 0, done.stderr
    copied = json.loads(done.stdout)["copied"]
    local = Ledger(source)
    assert copied["artifacts"] == len(local.list_artifacts(TEST_MODEL)) >= 1
    local_head = local.head(TEST_MODEL).id
    local.close()
    assert _cli_json(stack, shared, "models", "list", "--json")[0]["head"] == local_head

    again = copy(str(source))
    assert again.returncode == 1 and "not empty" in again.stderr and "Traceback" not in again.stderr


def _cli_json(stack, env: dict, *args: str):
    from tests.harness import REPO, UNLEARND

    out = subprocess.run([*UNLEARND, *args], cwd=REPO, env=stack.env(**env), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)

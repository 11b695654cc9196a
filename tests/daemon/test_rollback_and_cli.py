"""Rollback restores the exact earlier weights and is audited; the operator CLI works against a live daemon."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.harness import TEST_MODEL, request


def _weights(stack, version: str) -> dict[str, torch.Tensor]:
    return load_file(str(stack.state / "artifacts" / TEST_MODEL / "versions" / version / "model.safetensors"))


def test_rollback_is_bit_exact_recorded_and_announced(stack):
    original = {k: v.clone() for k, v in _weights(stack, "v0000").items()}
    stack.start()
    stack.publish(request("rb-1", sample_ids=[1, 2, 3, 4]))
    [applied] = stack.results(1, request_id="rb-1")
    changed = _weights(stack, applied["version"])
    assert any(not torch.equal(changed[k], original[k]) for k in original)

    out = json.loads(
        stack.cli("versions", "rollback", TEST_MODEL, "--to", "v0000", "--reason", "test", "--json").stdout
    )
    assert out == {"model": TEST_MODEL, "head": "v0000", "from": "v0001", "announced": True}

    ledger = stack.ledger()
    head = ledger.head(TEST_MODEL)
    assert head.id == "v0000"
    restored = _weights(stack, head.id)
    assert all(torch.equal(restored[k], original[k]) for k in original)  # bit for bit
    assert ledger.forgotten_ids(TEST_MODEL, head.id) == frozenset()
    assert [e["kind"] for e in ledger.events(TEST_MODEL, limit=1)] == ["rolled_back"]
    events = [json.loads(r.value) for r in stack.read("adapters", 2)]
    assert [(e["event"], e["artifact_id"]) for e in events] == [("published", "v0001"), ("rolled_back", "v0000")]
    # The CLI rolled back in its own process; the running daemon's metric (the one scraped) counts it.
    stack.wait_metric("unlearnd_rollbacks_total", 1.0, model=TEST_MODEL, event="rolled_back")

    # The running daemon builds the next version on the restored head, and the rolled-back samples are
    # forgettable again (they are no longer forgotten by the served model).
    stack.publish(request("rb-2", sample_ids=[1, 2]))
    [after] = stack.results(1, request_id="rb-2")
    assert after["status"] == "applied" and after["metrics"]["forgotten"] == 2
    assert ledger.get_artifact(TEST_MODEL, after["version"]).parent == "v0000"


def test_a_request_sent_again_after_its_rollback_is_not_answered_applied(stack):
    """A requester that re-sends a request (a retry after a timeout) must not be told its data is forgotten when an
    operator's rollback has undone that since: the answer, `requests show` and `requests list` say rolled_back,
    until the head's lineage holds the request's version again."""
    stack.start()
    body = request("rb-again", sample_ids=[5, 6, 7])
    stack.publish(body)
    [first] = stack.results(1, request_id="rb-again")
    assert (first["status"], first["version"]) == ("applied", "v0001")
    stack.cli("versions", "rollback", TEST_MODEL, "--to", "v0000", "--reason", "test")

    stack.publish(body)  # the same request, sent again
    again = stack.results(2, request_id="rb-again")[1]
    assert (again["status"], again["reason"], again["version"]) == ("rolled_back", "rolled_back", "v0001"), again
    assert "knows this data again" in again["error"] and "changed" not in again
    assert stack.ledger().head(TEST_MODEL).id == "v0000"  # answered, nothing applied
    shown = json.loads(stack.cli("requests", "show", "rb-again", "--json").stdout)
    assert (shown["status"], shown["artifact_id"]) == ("rolled_back", "v0001")
    listed = json.loads(stack.cli("requests", "list", "--status", "rolled_back", "--json").stdout)
    assert [r["request_id"] for r in listed] == ["rb-again"]
    published = stack.cli("publish", "--model", TEST_MODEL, "--sample-ids", "5,6,7", "--request-id", "rb-again",
                          "--wait", "--json", check=False)
    assert published.returncode == 1 and json.loads(published.stdout)["status"] == "rolled_back"

    # The operator rolls forward to the request's version: it is served, and answered applied, again.
    stack.cli("versions", "rollback", TEST_MODEL, "--to", "v0001", "--reason", "test")
    assert json.loads(stack.cli("requests", "show", "rb-again", "--json").stdout)["status"] == "applied"
    stack.publish(body)
    assert stack.results(4, request_id="rb-again")[3]["status"] == "applied"


def test_rollback_to_unknown_version_fails_clearly(stack):
    out = stack.cli("versions", "rollback", TEST_MODEL, "--to", "v0042", check=False)
    assert out.returncode == 1 and out.stderr.strip() == f"unlearnd: {TEST_MODEL} has no version v0042"


def test_rollback_to_the_head_is_refused_and_records_nothing(stack):
    """It once printed `head v0000 -> v0000` and recorded (and counted, in unlearnd_rollbacks_total) a rollback."""
    events = stack.ledger().events(TEST_MODEL)
    out = stack.cli("versions", "rollback", TEST_MODEL, "--to", "v0000", check=False)
    assert out.returncode == 1 and out.stderr.strip() == f"unlearnd: v0000 is already the head of {TEST_MODEL}"
    assert stack.ledger().events(TEST_MODEL) == events


def test_cli_publish_wait_and_inspect(stack):
    stack.start()
    out = stack.cli("publish", "--model", TEST_MODEL, "--sample-ids", "17,42,99", "--request-id", "cli-1",
                    "--subject", "user-7", "--wait", "--json", "--timeout", "60")
    result = json.loads(out.stdout)
    assert result["status"] == "applied" and result["version"] == "v0001"
    assert result["metrics"]["forget_acc_before"] >= result["metrics"]["forget_acc_after"]

    human = stack.cli("publish", "--model", TEST_MODEL, "--sample-ids", "5", "--wait").stdout
    assert "applied" in human and f"on {TEST_MODEL} with iau -> v0002" in human and "forget_acc" in human, human

    versions = json.loads(stack.cli("versions", "list", TEST_MODEL, "--json").stdout)
    assert [(v["id"], v["active"]) for v in versions] == [("v0000", False), ("v0001", False), ("v0002", True)]
    shown = json.loads(stack.cli("versions", "show", "v0001", "--json").stdout)
    assert shown["lineage"] == ["v0001", "v0000"] and shown["forgotten_samples"] == 3

    listed = json.loads(stack.cli("requests", "list", "--json").stdout)
    assert {r["request_id"] for r in listed} >= {"cli-1"}
    one = json.loads(stack.cli("requests", "show", "cli-1", "--json").stdout)
    assert (one["status"], one["subject"], one["forget_count"]) == ("applied", "user-7", 3)

    [model] = json.loads(stack.cli("models", "list", "--json").stdout)
    assert (model["model"], model["head"], model["versions"]) == (TEST_MODEL, "v0002", 3)

    assert stack.cli("health").returncode == 0

    rejected = stack.cli("publish", "--model", "nope", "--sample-ids", "1", "--wait", "--json", check=False)
    assert rejected.returncode == 2 and "unknown model 'nope'" in rejected.stderr  # checked before publishing


def test_health_fails_without_a_daemon(stack):
    out = stack.cli("health", check=False)
    assert out.returncode == 1 and "unhealthy" in out.stdout


def test_health_refuses_a_config_without_a_metrics_endpoint(stack):
    """health reads the metrics endpoint: without one it could never say healthy, so it says why at once."""
    text = stack.config_path.read_text()
    stack.config_path.write_text(text.replace(f"port = {stack.metrics_port}",
                                              f"port = {stack.metrics_port}\nenabled = false"))
    out = stack.cli("health", check=False)
    assert out.returncode == 2 and "metrics.enabled = false" in out.stderr, out

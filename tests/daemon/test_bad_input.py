"""Bad input never stops the daemon and is never dropped: each kind lands in the DLQ with its reason."""

from __future__ import annotations

import hashlib
import json

from daemon import dead_letter, schema
from daemon.kafka_io import HEADER_REASON, HEADER_SOURCE
from tests.harness import TEST_MODEL, request

BAD = [
    ("oversize", json.dumps(request("big", sample_ids=list(range(2000)))).encode()),
    ("invalid_utf8", b'{"request_id": "\xff\xfe"}'),
    ("invalid_json", b'{"request_id": "x", '),
    ("invalid_json", b'[1, 2, 3]'),
    ("schema", json.dumps({"request_id": "no-forget", "model": TEST_MODEL}).encode()),
    ("schema", json.dumps({**request("extra-field"), "colour": "blue"}).encode()),
    ("schema", json.dumps(request("wrong-type", sample_ids="17,42")).encode()),
    ("schema", json.dumps({**request("two-kinds"), "forget": {"sample_ids": [1], "class": 2}}).encode()),
    ("unknown_model", json.dumps({**request("who"), "model": "no-such-model"}).encode()),
    ("unknown_method", json.dumps({**request("how"), "method": "magic"}).encode()),
    ("unknown_method", json.dumps({**request("o3-on-classifier"), "method": "o3"}).encode()),
    # a method that would write a forged line (and clear a terminal) into the daemon's log
    ("unknown_method", json.dumps({**request("forged-line"), "method": "x\nFORGED: request ok-9 applied\x1b[2J"}
                                  ).encode()),
    # known classifier methods, each for the forget kind it is not served for unless an operator allows it
    ("method_not_allowed", json.dumps({**request("salun-on-samples"), "method": "salun"}).encode()),
    ("method_not_allowed", json.dumps({**request("iau-on-a-class", **{"class": 2}), "method": "iau"}).encode()),
    ("invalid_forget", json.dumps(request("ghost-ids", sample_ids=[1, 999_999])).encode()),
    ("invalid_forget", json.dumps(request("texts-for-classifier", texts=["hello"])).encode()),
]


def test_each_bad_input_lands_in_the_dlq_and_a_good_one_still_applies(stack):
    stack.start()
    for i, (_, raw) in enumerate(BAD):
        stack.publish(raw, headers=[("trace-id", f"t{i}".encode())])
    stack.publish(request("good-after-bad", sample_ids=[40, 41]))

    dead = stack.read("dlq", len(BAD))
    assert len(dead) == len(BAD)
    by_trace = {dict(r.headers)["trace-id"]: r for r in dead}
    for i, (reason, raw) in enumerate(BAD):
        rec = by_trace[f"t{i}".encode()]  # original headers kept
        headers = dict(rec.headers)
        assert headers[HEADER_REASON].decode() == reason, (i, headers)
        assert headers[HEADER_SOURCE].startswith(stack.topic("requests").encode())
        assert rec.key == TEST_MODEL.encode()
        if reason == "oversize":  # too large to copy: its start, hash and size, so the copy always fits
            assert rec.value == raw[:dead_letter.KEEP_BODY_BYTES]
            assert headers[dead_letter.HEADER_BODY_SHA256].decode() == hashlib.sha256(raw).hexdigest()
            assert int(headers[dead_letter.HEADER_BODY_BYTES]) == len(raw)
        else:
            assert rec.value == raw  # the original bytes, unchanged

    results = stack.results(len(BAD) + 1)
    rejected = [r for r in results if r["status"] == "rejected"]
    assert sorted(r["reason"] for r in rejected) == sorted(reason for reason, _ in BAD)
    [good] = [r for r in results if r.get("request_id") == "good-after-bad"]
    assert good["status"] == "applied"
    assert stack.procs[0].poll() is None  # still running

    # The audit trail has every rejection, by id where one could be read; raw forget data appears nowhere.
    ledger = stack.ledger()
    assert ledger.get_request("ghost-ids").reason == "invalid_forget"
    wrong_kind = ledger.get_request("texts-for-classifier")  # refused on admission: no engine attempt counted
    assert (wrong_kind.reason, wrong_kind.attempts) == ("invalid_forget", 0), wrong_kind
    assert "is a classifier model: it takes sample_ids or class requests, not texts" in wrong_kind.error
    assert ledger.get_request("how").status == "rejected"
    refused = ledger.get_request("salun-on-samples")
    assert (refused.status, refused.reason) == ("rejected", "method_not_allowed")
    assert "serves sample_ids requests with iau, not 'salun'" in refused.error, refused.error
    # A refused request's row says what was asked, as an applied one's does: method, kind, count, body digest.
    refused_body = json.loads(BAD[[i for i, (_, raw) in enumerate(BAD) if b"salun-on-samples" in raw][0]][1])
    assert (refused.method, refused.forget_kind, refused.forget_count) == ("salun", "sample_ids", 3)
    assert refused.body_sha256 == schema.body_sha256(refused_body)
    assert ledger.get_request("iau-on-a-class").forget_kind == "class"
    # The method a requester named is in the ledger and the result; never a metric label (one series per string).
    assert ledger.get_request("how").method == "magic"
    assert [r["method"] for r in results if r.get("request_id") == "how"] == ["magic"]
    assert 'method="magic"' not in stack.scrape()
    stack.wait_metric("unlearnd_requests_total", 1.0, model=TEST_MODEL, method="salun", status="rejected")
    stack.wait_metric("unlearnd_requests_total", 3.0, model=TEST_MODEL, method="iau", status="rejected")
    assert "999999" not in stack.log() and "hello" not in stack.log()
    # a requester's text in the log is quoted: it starts no line of its own and carries no terminal control
    assert not any(line.startswith("FORGED") for line in stack.log().splitlines()) and "\x1b" not in stack.log()
    assert "method='x\\nFORGED: request ok-9 applied\\x1b[2J'" in stack.log()
    stack.wait_metric("unlearnd_dlq_total", 4.0, reason="schema")


def test_signatures_are_required_when_a_key_is_configured(stack):
    key = "s3cret-key"
    stack.start(UNLEARND_HMAC_KEY=key)
    unsigned = request("unsigned")
    forged = {**request("forged"), "signature": "0" * 64}
    signed = request("signed", sample_ids=[50, 51])
    signed["signature"] = schema.sign(signed, key.encode())
    for body in (unsigned, forged, signed):
        stack.publish(body)
    by_id = {r["request_id"]: r for r in stack.results(3)}
    assert by_id["unsigned"]["reason"] == "missing_signature"
    assert by_id["forged"]["reason"] == "bad_signature"
    assert by_id["signed"]["status"] == "applied"
    # The signature covers the canonical body: key order and whitespace do not matter, content does.
    reordered = dict(reversed(list(signed.items())))
    assert schema.sign(reordered, key.encode()) == signed["signature"]
    assert schema.sign({**signed, "model": "other"}, key.encode()) != signed["signature"]


def test_a_message_reusing_another_requests_id_never_becomes_its_outcome(stack):
    """Request ids are the requester's: another message may reuse one, by mistake or to confuse. Its rejection
    names its own body (`body_sha256`): `publish --wait` waits past it for its own request's answer, and the
    ledger row of a request applied, failed or in flight is never made the other message's rejection."""
    import subprocess

    from tests.harness import REPO, UNLEARND

    ledger = stack.ledger()  # a request that failed for real before (its engine raised every attempt)
    ledger.begin_attempt("fail-1", model=TEST_MODEL, method="iau", subject=None, body_sha256="f" * 64,
                         forget_kind="sample_ids", forget_count=1, source="t/0/0")
    ledger.finish("fail-1", "failed", model=TEST_MODEL, method="iau", reason="engine_failed", error="boom")
    ledger.close()
    stack.cli("publish", "--model", TEST_MODEL, "--sample-ids", "5", "--request-id", "warm-1")  # makes the topics
    # Queued ahead of the real request, in its partition: a message that takes its id with an unknown model.
    impostor = {"request_id": "race-1", "model": "nope", "forget": {"sample_ids": [1]}}
    stack.publish(impostor)
    waiting = subprocess.Popen([*UNLEARND, "publish", "--model", TEST_MODEL, "--sample-ids", "800", "--request-id",
                                "race-1", "--wait", "--json", "--timeout", "120"], cwd=REPO, env=stack.env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stack.start()
    out, err = waiting.communicate(timeout=150)
    assert waiting.returncode == 0, err
    answer = json.loads(out)
    own = schema.body_sha256({"request_id": "race-1", "model": TEST_MODEL, "forget": {"sample_ids": [800]}})
    assert (answer["status"], answer["body_sha256"]) == ("applied", own)
    race = stack.results(2, request_id="race-1")
    assert sorted((r["status"], r["body_sha256"]) for r in race) == sorted(
        [("applied", own), ("rejected", schema.body_sha256(impostor))])

    # Now an applied and a failed request's ids, reused with other content: refused, and the rows stay as they were.
    stack.publish({"request_id": "race-1", "model": TEST_MODEL, "forget": {"sample_ids": [800]}, "x": 1})
    stack.publish(request("fail-1", sample_ids=[900]) | {"x": 1})
    stack.publish(request("after-impostors", sample_ids=[901]))
    stack.results(1, request_id="after-impostors")
    ledger = stack.ledger()
    applied, failed = ledger.get_request("race-1"), ledger.get_request("fail-1")
    assert (applied.status, applied.body_sha256) == ("applied", own)
    assert (failed.status, failed.reason, failed.body_sha256) == ("failed", "engine_failed", "f" * 64)
    [rejected] = stack.results(1, request_id="fail-1")
    assert rejected["reason"] == "schema" and rejected["body_sha256"] != "f" * 64
    assert stack.cli("requests", "retry", "fail-1", check=False).returncode == 0  # still failed, still retryable


def test_headers_named_like_the_daemons_are_only_the_clients_text(stack):
    """A client may name its headers anything, `unlearnd.*` included: they neither mark a valid request
    undecodable nor stand in a dead letter beside (or before) the daemon's own reason and source."""
    stack.start()
    spoofs = [("unlearnd.undecodable_record", b"spoofed"), ("unlearnd.undecodable_key:ff", b"x"),
              (HEADER_REASON, b"oversize"), (HEADER_SOURCE, b"fake/9/9"), ("trace-id", b"t1")]
    stack.publish(request("spoof-ok", sample_ids=[50]), headers=spoofs)
    stack.publish({**request("spoof-bad"), "x": 1}, headers=spoofs)
    assert stack.results(1, request_id="spoof-ok")[0]["status"] == "applied"
    [dead] = stack.read("dlq", 1)
    names = [k for k, _ in dead.headers]
    assert names.count(HEADER_REASON) == names.count(HEADER_SOURCE) == 1
    headers = dict(dead.headers)
    assert headers[HEADER_REASON] == b"schema" and headers[HEADER_SOURCE].startswith(stack.topic("requests").encode())
    assert (headers["trace-id"], headers["unlearnd.undecodable_record"]) == (b"t1", b"spoofed")  # kept as sent

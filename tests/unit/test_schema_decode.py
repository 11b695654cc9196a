"""schema.decode, table-driven: which bodies become requests, and which reason (and field) every other one gets."""

from __future__ import annotations

import json

import pytest

from daemon.schema import Rejected, body_sha256, decode, sign

MAX = 4096
KEY = b"secret"
BASE = {"request_id": "r-1", "model": "mnist-mlp", "forget": {"sample_ids": [1, 2]}}


def _raw(obj) -> bytes:
    return json.dumps(obj).encode()


def _with(**fields) -> bytes:
    return _raw({**BASE, **fields})


def _forget(forget) -> bytes:
    return _raw({**BASE, "forget": forget})


VALID = [
    ("sample_ids", _raw(BASE), lambda r: r.forget.to_forget().sample_ids == (1, 2)),
    ("texts", _forget({"texts": ["a b", "c d"]}), lambda r: r.forget.to_forget().texts == ("a b", "c d")),
    ("qa", _forget({"qa": [{"question": "Q?", "answer": "A"}]}), lambda r: r.forget.to_forget().qa == (("Q?", "A"),)),
    ("class", _forget({"class": 3}), lambda r: r.forget.to_forget().class_label == 3),
    ("concept", _forget({"concept": "cats"}), lambda r: r.forget.to_forget().concept == "cats"),
    ("image+box", _forget({"image": "i.png", "mask": {"box": [1, 2, 5, 6]}}),
     lambda r: r.forget.to_forget().kind == "image" and r.forget.to_forget().mask == '{"box":[1,2,5,6]}'),
    ("image+rle", _forget({"image": "i", "mask": {"rle": {"size": [2, 2], "counts": [1, 3]}}}),
     lambda r: r.forget.to_forget().mask == '{"rle":{"counts":[1,3],"size":[2,2]}}'),
    ("image+coco rle string", _forget({"image": "i", "mask": {"rle": {"size": [2, 2], "counts": "12"}}}),
     lambda r: r.forget.mask.rle.counts == "12"),
    ("optional fields", _with(method="iau", subject="user-1", issued_at="2026-11-24T09:00:00Z"),
     lambda r: r.method == "iau" and r.subject == "user-1" and r.issued_at.year == 2026),
    ("largest sample id", _forget({"sample_ids": [2**63 - 1]}), lambda r: r.forget.sample_ids == [2**63 - 1]),
    ("id with punctuation", _with(request_id="gdpr:2026/0042@eu.x-1"), lambda r: r.request_id.startswith("gdpr")),
    ("an id named twice is one sample", _forget({"sample_ids": [7, 3, 7, 7, 3]}),
     lambda r: r.forget.to_forget().sample_ids == (7, 3) and r.forget.size() == 2),
]


@pytest.mark.parametrize("raw, check", [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_bodies_become_requests(raw, check):
    request, digest = decode(raw, max_bytes=MAX, hmac_key=None)
    assert check(request)
    assert digest == body_sha256(json.loads(raw))


# (case, raw bytes, reason, words the detail must contain, request id and model the rejection is filed under)
INVALID = [
    ("tombstone", None, "invalid_json", "tombstone", None, None),
    ("oversize", b"x" * (MAX + 1), "oversize", f"{MAX + 1} bytes", None, None),
    ("not utf-8", b'{"a": "\xff"}', "invalid_utf8", "byte 7", None, None),
    ("not json", b"{nope", "invalid_json", "line 1", None, None),
    ("array", b"[1, 2]", "invalid_json", "got list", None, None),
    ("NaN", b'{"x": NaN}', "invalid_json", "NaN", None, None),
    ("repeated key", b'{"model": "a", "model": "b"}', "invalid_json", "repeats a key", None, None),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "invalid_json", "nested too deeply", None, None),
    ("lone surrogate", _with(subject="\\ud800").replace(b"\\\\ud800", b"\\ud800"), "schema", "surrogate",
     "r-1", "mnist-mlp"),
    ("missing forget", _raw({"request_id": "r-1", "model": "m"}), "schema", "forget", "r-1", "m"),
    ("unknown field", _with(priority=1), "schema", "priority", "r-1", "mnist-mlp"),
    ("two forget kinds", _forget({"sample_ids": [1], "texts": ["x"]}), "schema", "exactly one", "r-1", "mnist-mlp"),
    ("no forget kind", _forget({}), "schema", "exactly one", "r-1", "mnist-mlp"),
    ("image without mask", _forget({"image": "i.png"}), "schema", "go together", "r-1", "mnist-mlp"),
    ("mask as a string", _forget({"image": "i", "mask": "m.png"}), "schema", "forget.mask", "r-1", "mnist-mlp"),
    ("mask of both forms", _forget({"image": "i", "mask": {"box": [0, 0, 1, 1], "rle": {"size": [1, 1],
                                                                                         "counts": [0, 1]}}}),
     "schema", "exactly one of box or rle", "r-1", "mnist-mlp"),
    ("mask of neither form", _forget({"image": "i", "mask": {}}), "schema", "exactly one of box or rle", "r-1",
     "mnist-mlp"),
    ("box of three", _forget({"image": "i", "mask": {"box": [0, 0, 1]}}), "schema", "forget.mask.box", "r-1",
     "mnist-mlp"),
    ("float box", _forget({"image": "i", "mask": {"box": [0, 0, 1.5, 2]}}), "schema", "forget.mask.box.2", "r-1",
     "mnist-mlp"),
    ("image id too long", _forget({"image": "i" * 129, "mask": {"box": [0, 0, 1, 1]}}), "schema", "forget.image",
     "r-1", "mnist-mlp"),
    ("empty sample ids", _forget({"sample_ids": []}), "schema", "forget.sample_ids", "r-1", "mnist-mlp"),
    ("string sample id", _forget({"sample_ids": ["1"]}), "schema", "forget.sample_ids.0", "r-1", "mnist-mlp"),
    ("bool sample id", _forget({"sample_ids": [True]}), "schema", "forget.sample_ids.0", "r-1", "mnist-mlp"),
    ("float sample id", _forget({"sample_ids": [1.0]}), "schema", "forget.sample_ids.0", "r-1", "mnist-mlp"),
    ("negative sample id", _forget({"sample_ids": [-1]}), "schema", "forget.sample_ids.0", "r-1", "mnist-mlp"),
    ("sample id past int64", _forget({"sample_ids": [2**63]}), "schema", "forget.sample_ids.0", "r-1", "mnist-mlp"),
    ("empty answer", _forget({"qa": [{"question": "Q", "answer": ""}]}), "schema", "forget.qa.0.answer", "r-1",
     "mnist-mlp"),
    ("bad request id", _with(request_id="has space"), "schema", "request_id", None, "mnist-mlp"),
    ("numeric issued_at", _with(issued_at=1700000000), "schema", "issued_at", "r-1", "mnist-mlp"),
    ("model too long", _with(model="m" * 129), "schema", "model", "r-1", None),
    ("malformed signature", _with(signature="zz"), "schema", "signature", "r-1", "mnist-mlp"),
]


@pytest.mark.parametrize("raw, reason, words, request_id, model", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_bodies_are_rejected_with_their_reason(raw, reason, words, request_id, model):
    with pytest.raises(Rejected) as caught:
        decode(raw, max_bytes=MAX if len(raw or b"") < 10_000 else 10**6, hmac_key=None)
    exc = caught.value
    assert (exc.reason, exc.request_id, exc.model) == (reason, request_id, model)
    assert words in exc.detail and len(exc.detail) <= 1000


def test_a_rejection_never_echoes_forget_data():
    secret = "Alice Example's diagnosis"
    with pytest.raises(Rejected) as caught:
        decode(_forget({"texts": [secret, 7]}), max_bytes=MAX, hmac_key=None)
    assert caught.value.reason == "schema" and secret not in str(caught.value)


def test_signatures_are_required_and_checked_when_a_key_is_configured():
    body = dict(BASE)
    with pytest.raises(Rejected) as caught:
        decode(_raw(body), max_bytes=MAX, hmac_key=KEY)
    assert caught.value.reason == "missing_signature"
    signed = {**body, "signature": sign(body, KEY)}
    request, _ = decode(_raw(signed), max_bytes=MAX, hmac_key=KEY)
    assert request.request_id == "r-1"
    upper = {**body, "signature": sign(body, KEY).upper()}  # hex case does not matter
    assert decode(_raw(upper), max_bytes=MAX, hmac_key=KEY)[0].request_id == "r-1"
    for forged in ({**signed, "model": "other"}, {**body, "signature": sign(body, b"wrong")}):
        with pytest.raises(Rejected) as caught:
            decode(_raw(forged), max_bytes=MAX, hmac_key=KEY)
        assert caught.value.reason == "bad_signature"


def test_key_order_and_whitespace_do_not_change_the_body_hash():
    compact = b'{"forget":{"sample_ids":[1,2]},"model":"mnist-mlp","request_id":"r-1"}'
    spaced = b'{ "request_id": "r-1",\n  "model": "mnist-mlp", "forget": {"sample_ids": [1, 2]} }'
    assert decode(compact, max_bytes=MAX, hmac_key=None)[1] == decode(spaced, max_bytes=MAX, hmac_key=None)[1]

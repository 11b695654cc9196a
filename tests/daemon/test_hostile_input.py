"""No message content, header or size may crash the daemon or stop its partition.

Three layers: the corpus of hostile records (tests/hostile.py) table-driven through `decode` and the dead-letter
builder; properties over arbitrary bytes and JSON (hypothesis); and the corpus through a real broker and daemon,
interleaved with valid requests, with the records kafka-python's producer cannot write sent by a raw producer.
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatch

from daemon import dead_letter, record_decoding
from daemon.kafka_io import HEADER_REASON, HEADER_SOURCE, PRODUCE_HEADROOM_BYTES
from daemon.schema import REQUEST_ID_PATTERN, Rejected, decode
from tests.harness import TEST_MODEL, request
from tests.hostile import RawProducer, _record_body, corpus, record_batch

MAX_BYTES = 8192  # as in tests/harness.py's config
CORPUS = corpus(MAX_BYTES)
BODY_CASES = [h for h in CORPUS if not h.needs_raw_producer and h.reason not in
              ("oversize", "unknown_model", "unknown_method", "invalid_forget")]


def _decode(raw):
    return decode(raw, max_bytes=MAX_BYTES, hmac_key=None)


def _storable(text: str | None) -> bool:
    return text is None or (text.encode("utf-8") is not None and len(text) <= 1000)


@pytest.mark.parametrize("case", BODY_CASES, ids=[h.name for h in BODY_CASES])
def test_each_hostile_body_is_rejected_with_its_reason(case):
    with pytest.raises(Rejected) as rejected:
        _decode(case.value)
    assert rejected.value.reason == case.reason
    # Whatever is filed with the rejection can be written to SQLite, a header and a result event.
    for text in (rejected.value.request_id, rejected.value.model, rejected.value.detail):
        assert _storable(text)


@pytest.mark.parametrize("value, what", [(["1"], "a string"), ([True], "a bool"), ([1.0], "a float"),
                                         ([" 7 "], "a padded string"), ([None], "null")])
def test_sample_ids_are_never_coerced(value, what):
    body = json.dumps(request("strict", sample_ids=value)).encode()
    with pytest.raises(Rejected, match="schema"):
        _decode(body)


def test_valid_requests_still_decode():
    for body in (request("ok-1"), {**request("ok-2"), "issued_at": "2026-11-24T09:00:00Z", "subject": "u-1"},
                 {"request_id": "ok-3", "model": TEST_MODEL, "forget": {"class": 3}},
                 {"request_id": "ok-4", "model": "m", "forget": {"qa": [{"question": "q?", "answer": "a"}]}}):
        req, digest = _decode(json.dumps(body).encode())
        assert req.request_id == body["request_id"] and len(digest) == 64
        # the same body after a UTF-8 byte order mark (Windows tools write one): the same request, the same digest
        assert _decode("\ufeff".encode() + json.dumps(body).encode()) == (req, digest)


# --- properties ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_any_bytes_decode_or_reject_cleanly(raw):
    try:
        _decode(raw)
    except Rejected as rej:
        assert _storable(rej.request_id) and _storable(rej.model) and _storable(rej.detail)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["request_id", "model", "forget", "method", "subject", "issued_at",
                                        "signature", "x"]), json_values, max_size=6))
def test_any_json_object_decodes_or_rejects_cleanly(obj):
    try:
        req, _ = _decode(json.dumps(obj).encode())
    except Rejected as rej:
        assert rej.reason in ("schema", "invalid_json", "oversize")
        assert rej.request_id is None or __import__("re").fullmatch(REQUEST_ID_PATTERN, rej.request_id)
        return
    # Accepted: then every field really has its declared type (nothing was coerced on the way).
    raw_ids = obj["forget"].get("sample_ids")
    if raw_ids is not None:
        assert all(type(i) is int for i in raw_ids) and req.forget.sample_ids == raw_ids


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(), st.text(max_size=3), st.booleans(), st.floats(allow_nan=False, allow_infinity=False)),
        min_size=1,
        max_size=5,
    )
)
def test_sample_ids_accept_exactly_non_negative_ints(ids):
    body = json.dumps(request("prop", sample_ids=ids)).encode()
    valid = all(type(i) is int and 0 <= i < 2**63 for i in ids)
    try:
        req, _ = _decode(body)
        assert valid and req.forget.sample_ids == list(dict.fromkeys(ids))  # each id once, in order
    except Rejected as rej:
        assert not valid and rej.reason == "schema"


header_keys = (st.text(max_size=20) | st.text(alphabet=string.ascii_letters, max_size=5000)
               | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3))
header_values = st.none() | st.binary(max_size=3000)


@settings(max_examples=200, deadline=None)
@given(st.none() | st.binary(max_size=20_000), st.none() | st.binary(max_size=3000),
       st.lists(st.tuples(header_keys, header_values), max_size=6), st.integers(256, 8192))
def test_dead_letter_always_fits_and_is_sendable(value, key, headers, budget):
    k, v, hs = dead_letter.build(value, key, headers, reason="schema", error="x" * 5000, source="t/0/1",
                                 budget=budget)
    size = dead_letter.record_size(k, v, hs)
    assert size <= budget + PRODUCE_HEADROOM_BYTES
    for hk, hv in hs:  # what kafka-python's producer insists on
        assert isinstance(hk, str) and isinstance(hv, bytes)
        hk.encode("utf-8")
    if dead_letter.record_size(key, value, headers) <= budget:
        assert k == key and (v == value or (key, value, v) == (None, None, b""))  # fits: copied unchanged
    names = dict(hs)
    assert names[HEADER_REASON] == b"schema" and names[HEADER_SOURCE] == b"t/0/1"
    assert k is not None or v is not None  # kafka-python's producer needs one of them


def _read(bodies: list[bytes], **kw) -> list:
    record_decoding.install()
    with_deltas = [b[:2] + bytes([2 * i]) + b[3:] for i, b in enumerate(bodies)]  # offset deltas 0, 1, ...
    return list(DefaultRecordBatch(record_batch(with_deltas, **kw)))


def test_undecodable_header_key_is_read_with_its_bytes_in_hex():
    """kafka-python raises for a non-UTF-8 header key from inside poll(); with the tolerant reader the record and
    the good records batched with it arrive intact."""
    records = _read([_record_body(b"k", b"bad", [(b"\xff\xfe", b"v"), (b"fine", None)]), _record_body(b"k", b"good")])
    assert [r.value for r in records] == [b"bad", b"good"]
    assert records[0].headers == [(record_decoding.UNDECODABLE_KEY_PREFIX + "fffe", b"v"), ("fine", None)]
    assert [r.offset for r in records] == [0, 1]
    assert record_decoding.written_here(records[0].headers[0][0], record_decoding.UNDECODABLE_KEY_PREFIX)


def test_a_clients_header_named_like_the_decoders_is_only_its_own_text():
    """Only the decoder can mark a record undecodable: a client's header of the same name, beside a non-UTF-8 key
    the decoder spells in hex, stays a plain header that admission does not read."""
    spoofs = [(record_decoding.UNDECODABLE_RECORD_HEADER.encode(), b"spoofed"),
              ((record_decoding.UNDECODABLE_KEY_PREFIX + "ff").encode(), b"x"), (b"\xff", b"real")]
    [record] = _read([_record_body(b"k", b"v", spoofs)])
    assert [record_decoding.written_here(k, "unlearnd.") for k, _ in record.headers] == [False, False, True]


@pytest.mark.parametrize(
    "broken", [_record_body(b"k", b"x", header_count=-2), _record_body(b"k", b"x", header_count=3)]
)
def test_unparseable_record_becomes_a_placeholder_at_its_offset(broken):
    bad, good = _read([broken, _record_body(b"k", b"good")])
    assert (bad.offset, bad.value, bad.key) == (0, None, None)
    assert record_decoding.written_here(bad.headers[0][0], record_decoding.UNDECODABLE_RECORD_HEADER)
    assert (good.offset, good.value) == (1, b"good")


def test_batch_failing_its_crc_becomes_one_placeholder():
    from kafka.record.memory_records import MemoryRecords

    record_decoding.install()
    with_deltas = [_record_body(b"k", b"a"), _record_body(b"k", b"b")[:2] + b"\x02" + _record_body(b"k", b"b")[3:]]
    batch = MemoryRecords(record_batch(with_deltas, bad_crc=True)).next_batch()
    assert batch.validate_crc()  # reported as valid, and read as one placeholder instead
    [placeholder] = list(batch)
    assert placeholder.offset == 0 and b"failed its CRC check" in placeholder.headers[0][1]
    assert b"offsets 0..1" in placeholder.headers[0][1]


GARBLED = {1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd", 5: "no such codec"}  # a batch's compression codec ids


@pytest.mark.parametrize("codec", sorted(GARBLED))
def test_batch_that_cannot_be_decompressed_becomes_one_placeholder(codec):
    """Bytes that are not what the batch's codec says (its CRC is right: it covers the compressed bytes), or a
    codec kafka-python does not know: one placeholder for the batch, not an exception out of poll()."""
    from kafka.record.memory_records import MemoryRecords

    record_decoding.install()
    bodies = [_record_body(b"k", b"a"), _record_body(b"k", b"b")[:2] + b"\x02" + _record_body(b"k", b"b")[3:]]
    batch = MemoryRecords(record_batch(bodies, codec=codec, compressed=lambda raw: b"\x00garbage" + raw)).next_batch()
    [placeholder] = list(batch)
    assert placeholder.offset == 0 and placeholder.value is None
    assert b"offsets 0..1 could not be decompressed" in placeholder.headers[0][1], placeholder.headers


# --- through a real broker and daemon -----------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_compressed_requests_of_every_kafka_codec_are_applied(stack, codec):
    """Producers compress (Java's and librdkafka's clients are often set to lz4, zstd or snappy; a topic can
    recompress on the broker): a request in a batch of any of Kafka's codecs is read and applied, and one whose
    batch cannot be decompressed is dead-lettered without stopping its partition."""
    from kafka import KafkaProducer

    proc = stack.start()
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap, compression_type=codec)
    try:
        for i in range(3):  # one batch of three records
            producer.send(stack.topic("requests"), key=TEST_MODEL.encode(),
                          value=json.dumps(request(f"{codec}-{i}", sample_ids=[500 + i])).encode())
        producer.flush(10)
    finally:
        producer.close()
    raw = RawProducer(stack.bootstrap)
    try:
        bad = raw.send(stack.topic("requests"), 0, [_record_body(TEST_MODEL.encode(), b"{}")],
                       codec=list(GARBLED.values()).index(codec) + 1, compressed=lambda body: b"not " + body)
        raw.send(stack.topic("requests"), 0, [_record_body(TEST_MODEL.encode(),
                                                           json.dumps(request(f"{codec}-after")).encode())])
    finally:
        raw.close()
    results = stack.results(5, timeout=90)  # the unreadable batch's rejection has no request id to give
    assert {r.get("request_id"): r["status"] for r in results} == {f"{codec}-{i}": "applied" for i in (0, 1, 2)} | {
        f"{codec}-after": "applied", None: "rejected"}
    [dead] = stack.read("dlq", 1)
    assert dict(dead.headers)[HEADER_REASON] == b"undecodable_record"
    assert dict(dead.headers)[HEADER_SOURCE] == f"{stack.topic('requests')}/0/{bad}".encode()
    assert proc.poll() is None



def test_hostile_corpus_through_the_daemon_loses_nothing(stack):
    """Every hostile record is dead-lettered with its reason (found by its source offset), each valid request
    sent after it is applied (its partition moved on), and the daemon never exits."""
    proc = stack.start()
    raw = RawProducer(stack.bootstrap)
    topic = stack.topic("requests")
    sent = {}  # source -> case
    try:
        for i, case in enumerate(corpus(MAX_BYTES, tag="it")):
            offset = raw.send_hostile(topic, 0, case)
            sent[f"{topic}/0/{offset}"] = case
            good = request(f"good-{i}", sample_ids=[300 + i])
            raw.send(topic, 0, [_record_body(TEST_MODEL.encode(), json.dumps(good).encode())])
    finally:
        raw.close()
    dead = stack.read("dlq", len(sent), timeout=120)
    by_source = {dict(r.headers)[HEADER_SOURCE].decode(): r for r in dead}
    for source, case in sent.items():
        assert source in by_source, f"{case.name}: no dead letter"
        assert dict(by_source[source].headers)[HEADER_REASON].decode() == case.reason, case.name
    goods = [r for r in stack.results(len(sent) * 2, timeout=120) if r.get("request_id", "").startswith("good-")]
    assert len(goods) == len(sent) and all(r["status"] == "applied" for r in goods)
    assert proc.poll() is None
    null_case = next(s for s, c in sent.items() if c.name.startswith("null header"))
    assert dict(by_source[null_case].headers)[dead_letter.HEADER_NULL_HEADERS] == b"trace"
    # Rejections with an unreadable request_id are kept as audit events, not rows under a garbled id.
    ledger = stack.ledger()
    assert all(r.request_id.isascii() for r in ledger.list_requests(limit=1000))

"""Hostile records for tests and bench/chaos.py: the corpus of bad requests, and a raw producer for records that
kafka-python's own producer refuses to write (header keys that are not UTF-8, null header values, corrupt records).

`RawProducer` speaks the Kafka protocol itself (ProduceRequest v3, record batch v2) over one socket: enough to put
any bytes a real, buggy or hostile client could send into a partition.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka.record.util import calc_crc32c, encode_varint

TEST_MODEL = "digits-mlp"


@dataclass
class Hostile:
    """One hostile record: what to send, and the dead-letter reason it must end with."""

    name: str
    reason: str
    value: bytes | None
    key: bytes | None = TEST_MODEL.encode()
    headers: list = field(default_factory=list)  # (bytes or str key, bytes or None value)
    raw_record: bytes | None = None  # a hand-made record body, for corruption a valid encoder cannot produce
    bad_crc: bool = False  # send its batch with a wrong CRC (the embedded broker does not check)

    @property
    def needs_raw_producer(self) -> bool:
        return (self.raw_record is not None or self.bad_crc
                or any(not isinstance(k, str) or v is None for k, v in self.headers))


def _req(rid: str, **over) -> dict:
    body = {"request_id": rid, "model": TEST_MODEL, "forget": {"sample_ids": [1, 2, 3]}}
    body.update(over)
    return body


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def corpus(max_bytes: int, tag: str = "h") -> list[Hostile]:
    """Every hostile case we know of, for a daemon whose requests.max_bytes is `max_bytes`.

    `tag` makes request ids unique per use (a request id that was rejected may be judged again)."""
    deep = b'{"request_id": "' + f"{tag}-deep".encode() + b'", "model": "' + TEST_MODEL.encode() + b'", "forget": ' \
        + b"[" * 3000 + b"]" * 3000 + b"}"
    big_int = b'{"request_id": "' + f"{tag}-bigint".encode() + b'", "model": "' + TEST_MODEL.encode() \
        + b'", "forget": {"sample_ids": [' + b"9" * 5000 + b"]}}"
    oversize = _j(_req(f"{tag}-big", forget={"sample_ids": list(range(max_bytes))}))
    return [
        # One message that crashed the daemon
        Hostile("deep nesting", "invalid_json", deep[: max_bytes - 1] if len(deep) >= max_bytes else deep),
        Hostile("integer over 4,300 digits", "invalid_json", big_int),
        Hostile("lone surrogate in model", "schema",
                f'{{"request_id": "{tag}-sur-model", "model": "\\ud800", "forget": {{"sample_ids": [1]}}}}'.encode()),
        Hostile("lone surrogate in request_id", "schema",
                f'{{"request_id": "{tag}-\\udfff", "model": "{TEST_MODEL}", "forget": {{"sample_ids": [1]}}}}'
                .encode()),
        Hostile("lone surrogate in a key", "schema",
                f'{{"request_id": "{tag}-sur-key", "\\ud83d": 1, "model": "{TEST_MODEL}"}}'.encode()),
        Hostile("null header value on an invalid body", "invalid_json", b"{not json",
                headers=[("trace", None), ("ok", b"1")]),
        # One message that stalled its partition
        Hostile("oversize body", "oversize", oversize),
        Hostile("oversize headers", "oversize", _j(_req(f"{tag}-hdrs")), headers=[("blob", b"x" * max_bytes)]),
        Hostile("oversize key", "oversize", _j(_req(f"{tag}-key")), key=b"k" * max_bytes),
        Hostile("header key not UTF-8", "undecodable_record", _j(_req(f"{tag}-badkey")),
                headers=[(b"\xff\xfe-key", b"v"), ("fine", b"1")]),
        Hostile("corrupt record (negative header count)", "undecodable_record", None,
                raw_record=_record_body(None, b"{}", header_count=-2)),
        Hostile("corrupt record (header past its end)", "undecodable_record", None,
                raw_record=_record_body(None, b"{}", header_count=3)),
        Hostile("record batch failing its CRC check", "undecodable_record", _j(_req(f"{tag}-crc")), bad_crc=True),
        # Wrong types are not guessed at
        Hostile('"1" as a sample id', "schema", _j(_req(f"{tag}-str1", forget={"sample_ids": ["1"]}))),
        Hostile("true as a sample id", "schema", _j(_req(f"{tag}-true", forget={"sample_ids": [True]}))),
        Hostile("1.0 as a sample id", "schema", _j(_req(f"{tag}-float", forget={"sample_ids": [1.0]}))),
        Hostile('" 7 " as a sample id', "schema", _j(_req(f"{tag}-space", forget={"sample_ids": [" 7 "]}))),
        Hostile("true as a class", "schema", _j(_req(f"{tag}-classtrue", forget={"class": True}))),
        Hostile("number as request_id", "schema", _j(_req(7))),
        Hostile("number as issued_at", "schema", _j(_req(f"{tag}-ts", issued_at=1700000000))),
        Hostile("sample id past int64", "schema", _j(_req(f"{tag}-i64", forget={"sample_ids": [2**64]}))),
        Hostile("negative sample id", "schema", _j(_req(f"{tag}-neg", forget={"sample_ids": [-1]}))),
        # Everything else a producer can get wrong
        Hostile("tombstone", "invalid_json", None),
        Hostile("keyless tombstone", "invalid_json", None, key=None),
        Hostile("empty value", "invalid_json", b""),
        Hostile("not UTF-8", "invalid_utf8", b'{"request_id": "\xff\xfe"}'),
        Hostile("truncated JSON", "invalid_json", b'{"request_id": "x", '),
        Hostile("NaN", "invalid_json", f'{{"request_id": "{tag}-nan", "forget": {{"sample_ids": [NaN]}}}}'.encode()),
        Hostile("duplicate keys", "invalid_json",
                f'{{"request_id": "{tag}-dup", "request_id": "{tag}-dup2", "model": "{TEST_MODEL}", '
                f'"forget": {{"sample_ids": [1]}}}}'.encode()),
        Hostile("array body", "invalid_json", b"[1, 2, 3]"),
        Hostile("string body", "invalid_json", b'"hello"'),
        Hostile("empty object", "schema", b"{}"),
        Hostile("extra field", "schema", _j({**_req(f"{tag}-extra"), "colour": "blue"})),
        Hostile("two forget kinds", "schema", _j(_req(f"{tag}-two", forget={"sample_ids": [1], "class": 2}))),
        Hostile("empty sample list", "schema", _j(_req(f"{tag}-empty", forget={"sample_ids": []}))),
        Hostile("bad request_id characters", "schema", _j(_req(f"{tag} has spaces"))),
        Hostile("control characters in model", "schema", _j(_req(f"{tag}-ctl", model="a\nb\x00c" * 50))),
        Hostile("unknown model", "unknown_model", _j(_req(f"{tag}-who", model="no-such-model"))),
        Hostile("unknown method", "unknown_method", _j(_req(f"{tag}-how", method="magic"))),
        Hostile("unknown sample ids", "invalid_forget", _j(_req(f"{tag}-ghost", forget={"sample_ids": [999_999]}))),
    ]


# --- a raw producer -----------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    encode_varint(n, out.append)
    return bytes(out)


def _bytes_field(b: bytes | None) -> bytes:
    return _varint(-1) if b is None else _varint(len(b)) + b


def _record_body(key: bytes | None, value: bytes | None, headers: list = (), *, header_count: int | None = None,
                 offset_delta: int = 0) -> bytes:
    """A v2 record without its length prefix: attributes, deltas, key, value, headers (keys may be any bytes,
    values may be None)."""
    out = b"\x00" + _varint(0) + _varint(offset_delta) + _bytes_field(key) + _bytes_field(value)
    out += _varint(len(headers) if header_count is None else header_count)
    for k, v in headers:
        k = k.encode() if isinstance(k, str) else k
        out += _varint(len(k)) + k + _bytes_field(v)
    return out


def record_batch(records: list[bytes], *, bad_crc: bool = False, codec: int = 0,
                 compressed: Callable[[bytes], bytes] | None = None) -> bytes:
    """A v2 record batch of pre-encoded record bodies (offset deltas must be 0..n-1), with a correct CRC (or a
    wrong one). `codec` (1 gzip, 2 snappy, 3 lz4, 4 zstd) goes in the attributes, and the records' bytes through
    `compressed` (which may return anything: the CRC covers what it returns)."""
    now = int(time.time() * 1000)
    body = b"".join(_varint(len(r)) + r for r in records)
    if compressed is not None:
        body = compressed(body)
    after_crc = struct.pack(">hiqqqhii", codec, len(records) - 1, now, now, -1, -1, -1, len(records)) + body
    crc = calc_crc32c(memoryview(after_crc)) ^ (1 if bad_crc else 0)
    head = struct.pack(">qiibI", 0, 4 + 1 + 4 + len(after_crc), -1, 2, crc)
    return head + after_crc


class RawProducer:
    """Writes hand-made record batches with ProduceRequest v3 (acks=all) and returns their base offsets."""

    def __init__(self, bootstrap: str):
        host, port = bootstrap.split(",")[0].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.correlation = 0

    def send(self, topic: str, partition: int, bodies: list[bytes], *, bad_crc: bool = False, codec: int = 0,
             compressed: Callable[[bytes], bytes] | None = None) -> int:
        bodies = [self._with_delta(b, i) for i, b in enumerate(bodies)]
        batch = record_batch(bodies, bad_crc=bad_crc, codec=codec, compressed=compressed)
        self.correlation += 1
        t = topic.encode()
        req = struct.pack(">hhih", 0, 3, self.correlation, 3) + b"raw" + struct.pack(">hhi", -1, -1, 30000)
        req += struct.pack(">ih", 1, len(t)) + t + struct.pack(">iii", 1, partition, len(batch)) + batch
        self.sock.sendall(struct.pack(">i", len(req)) + req)
        resp = self._read()
        # ProduceResponse v3: [topic [partition error_code base_offset log_append_time]] throttle
        pos = 4 + 4
        (name_len,) = struct.unpack_from(">h", resp, pos)
        pos += 2 + name_len + 4
        part, error, base = struct.unpack_from(">ihq", resp, pos)
        if error:
            raise RuntimeError(f"produce to {topic}/{part} failed with error code {error}")
        return base

    def send_hostile(self, topic: str, partition: int, h: Hostile) -> int:
        body = h.raw_record if h.raw_record is not None else _record_body(h.key, h.value, h.headers)
        return self.send(topic, partition, [body], bad_crc=h.bad_crc)

    def close(self) -> None:
        self.sock.close()

    def _read(self) -> bytes:
        size = struct.unpack(">i", self._exactly(4))[0]
        resp = self._exactly(size)
        if struct.unpack_from(">i", resp)[0] != self.correlation:
            raise RuntimeError("unexpected correlation id")
        return resp

    def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return buf

    @staticmethod
    def _with_delta(body: bytes, delta: int) -> bytes:
        """Set a record body's offset delta (attributes byte, timestamp delta 0, then the offset delta)."""
        assert body[1:2] == _varint(0) and body[2:3] == _varint(0), "records are built with zero deltas"
        return body[:2] + _varint(delta) + body[3:]

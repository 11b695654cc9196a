"""Dead letters: the original record plus why it was refused, built so that it can always be delivered.

A dead letter keeps the original value, key and headers unchanged whenever they fit, so an operator can fix and
replay it. A record that does not fit (`oversize`, or huge headers) keeps what identifies it instead: the first
`KEEP_BODY_BYTES` of its value, the value's SHA-256 and size, and as many original headers as fit. Kafka allows
null header values but kafka-python's producer does not, so a null value is sent as empty and its key listed in
`unlearnd.null_headers`. A dead letter is never larger than `budget` (requests.max_bytes) plus the kept start of
the value and key and this module's own bounded headers: a few KiB, well inside the producer's headroom.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from daemon.schema import DeadLetterReason

HEADER_REASON = "unlearnd.reason"
HEADER_ERROR = "unlearnd.error"
HEADER_SOURCE = "unlearnd.source"  # topic/partition/offset the record was read from
HEADER_FAILED_AT = "unlearnd.failed_at"
HEADER_BODY_SHA256 = "unlearnd.body_sha256"  # set when the value was truncated: the original's hash ...
HEADER_BODY_BYTES = "unlearnd.body_bytes"  # ... and size
HEADER_TRUNCATED = "unlearnd.truncated"  # what was cut: "value", "key", "headers" (comma-separated)
HEADER_NULL_HEADERS = "unlearnd.null_headers"  # keys of original headers whose value was null
#: What the daemon says of a dead letter. The record's own headers of these names (a client's, or an earlier dead
#: letter's when one is replayed) are dropped: the dead letter holds one of each, the daemon's.
OWN_HEADERS = frozenset({HEADER_REASON, HEADER_ERROR, HEADER_SOURCE, HEADER_FAILED_AT, HEADER_BODY_SHA256,
                         HEADER_BODY_BYTES, HEADER_TRUNCATED, HEADER_NULL_HEADERS})

KEEP_BODY_BYTES = 4096  # of a value too large to copy: enough to see which request it was
KEEP_KEY_BYTES = 1024
MAX_ERROR_BYTES = 1000

Headers = list[tuple[str, bytes | None]]


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> int:
    """Bytes of a record's key, value and headers (what a request's size cap applies to)."""
    return len(key or b"") + len(value or b"") + sum(len(k.encode("utf-8", "replace")) + len(v or b"")
                                                     for k, v in headers)


def build(value: bytes | None, key: bytes | None, headers: Headers, *, reason: DeadLetterReason, error: str,
          source: str, budget: int) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(key, value, headers) of the dead letter for a record: unchanged if the record fits in `budget` (but for
    headers named as the daemon's own, OWN_HEADERS)."""
    headers = [(k, v) for k, v in headers if k not in OWN_HEADERS]
    nulls = [k for k, v in headers if v is None]
    kept = sendable(headers)
    extra = [(HEADER_REASON, reason.encode()), (HEADER_ERROR, error.encode("utf-8", "replace")[:MAX_ERROR_BYTES]),
             (HEADER_SOURCE, source.encode()), (HEADER_FAILED_AT, str(time.time()).encode())]
    if nulls:
        extra.append((HEADER_NULL_HEADERS, ",".join(nulls).encode("utf-8", "replace")[:MAX_ERROR_BYTES]))
    truncated = []
    if record_size(key, value, kept) > budget:
        if value is not None and len(value) > KEEP_BODY_BYTES:
            extra += [(HEADER_BODY_SHA256, hashlib.sha256(value).hexdigest().encode()),
                      (HEADER_BODY_BYTES, str(len(value)).encode())]
            value = value[:KEEP_BODY_BYTES]
            truncated.append("value")
        if key is not None and len(key) > KEEP_KEY_BYTES:
            key = key[:KEEP_KEY_BYTES]
            truncated.append("key")
        if record_size(None, None, kept) > budget:
            kept = _headers_within(kept, budget)
            truncated.append("headers")
    if truncated:
        extra.append((HEADER_TRUNCATED, ",".join(truncated).encode()))
    if key is None and value is None:  # a record of neither (a keyless tombstone, an undecodable record):
        value = b""  # kafka-python sends nothing without one of the two
    return key, value, kept + extra


def sendable(headers: Headers) -> list[tuple[str, bytes]]:
    """Headers kafka-python's producer accepts: UTF-8 keys, bytes values (a null value becomes empty)."""
    return [(k.encode("utf-8", "replace").decode("utf-8"), v if v is not None else b"") for k, v in headers]


def _headers_within(headers: list[tuple[str, bytes]], room: int) -> list[tuple[str, bytes]]:
    """The original headers, in order, for as long as they fit in `room` bytes."""
    out = []
    for k, v in headers:
        room -= len(k.encode("utf-8", "replace")) + len(v)
        if room < 0:
            break
        out.append((k, v))
    return out

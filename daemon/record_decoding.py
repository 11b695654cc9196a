"""Records whose header keys are not UTF-8 still reach the daemon, intact.

kafka-python decodes every header key as UTF-8 and raises CorruptRecordError from inside poll() for any other
bytes. The record's whole batch is decoded again on every fetch, so the partition would never move past it, and
good records batched with it would be lost with it. `install()` makes that one step tolerant: an undecodable key
arrives as `UNDECODABLE_KEY_PREFIX + <hex of its bytes>`, and the daemon dead-letters the record with reason
`undecodable_record`, value, key and other headers unchanged.

It wraps kafka-python's record reader (`DefaultRecordBatch._read_msg`, kafka-python 3.0): on a UnicodeDecodeError
the record is rewritten in the batch's in-memory buffer (CRCs are checked before records are read) and read
again. Any other corruption still raises; the daemon then skips the record by offset (daemon/app.py).
"""

from __future__ import annotations

from kafka.record import default_records
from kafka.record.util import decode_varint, encode_varint

UNDECODABLE_KEY_PREFIX = "unlearnd.undecodable_key:"


def install() -> None:
    """Idempotent; called by the daemon before it creates its consumer."""
    batch = default_records.DefaultRecordBatch
    if getattr(batch._read_msg, "tolerant_header_keys", False):
        return
    original = batch._read_msg

    def _read_msg(self, *args, **kwargs):
        start = self._pos
        try:
            return original(self, *args, **kwargs)
        except UnicodeDecodeError:
            end, rewritten = _with_readable_header_keys(self._buffer, start)
            self._buffer[start:end] = rewritten
            self._pos = start
            return original(self, *args, **kwargs)

    _read_msg.tolerant_header_keys = True
    batch._read_msg = _read_msg


def _with_readable_header_keys(buffer: bytearray, start: int) -> tuple[int, bytes]:
    """(end of the record at `start`, the record re-encoded with every non-UTF-8 header key spelled in hex)."""
    length, body = decode_varint(buffer, start)
    end = body + length
    pos = body
    for _ in range(3):  # attributes, timestamp delta, offset delta
        _, pos = decode_varint(buffer, pos)
    for _ in range(2):  # key, value (length -1 = null)
        n, pos = decode_varint(buffer, pos)
        pos += max(n, 0)
    out = bytearray(buffer[body:pos])
    count, pos = decode_varint(buffer, pos)
    encode_varint(count, out.append)
    for _ in range(count):
        n, pos = decode_varint(buffer, pos)
        key = bytes(buffer[pos:pos + n])
        pos += n
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            key = (UNDECODABLE_KEY_PREFIX + key.hex()).encode()
        encode_varint(len(key), out.append)
        out += key
        n, pos = decode_varint(buffer, pos)
        encode_varint(n, out.append)
        if n > 0:
            out += buffer[pos:pos + n]
            pos += n
    if pos != end:
        raise ValueError("record length does not match its fields")  # reported as CorruptRecordError
    record = bytearray()
    encode_varint(len(out), record.append)
    return end, bytes(record + out)

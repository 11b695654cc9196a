"""Records kafka-python cannot decode still reach the daemon, as what can be recovered of them.

kafka-python raises CorruptRecordError from inside poll() for a header key that is not UTF-8, for a record whose
fields do not add up, and for a batch that fails its CRC check. Worse, after such an error its fetcher keeps
returning nothing for the stuck partition (a later poll can even spin forever), so one record would stop a
partition for good, and good records batched with it would be lost with it. `install()` makes the decoder
tolerant instead, at the level of one record or one batch:

- a header key that is not UTF-8 arrives as `UNDECODABLE_KEY_PREFIX + <hex of its bytes>`, everything else of the
  record intact;
- a record that cannot be parsed arrives as a placeholder at its offset: no key, no value, one header
  `UNDECODABLE_RECORD_HEADER` saying what was wrong;
- a batch that fails its CRC check (nothing in it can be trusted), or whose compressed records cannot be
  decompressed (a codec kafka-python has no library for, or bytes that are not what the codec says), arrives as
  one placeholder at its base offset naming the offsets it covered; the fetcher then continues after the batch.

The daemon dead-letters all of these as `undecodable_record`, with topic/partition/offset. This wraps
kafka-python 3.0's `DefaultRecordBatch` (`_read_msg`, `validate_crc`, `__iter__`, `__next__`): the in-memory batch
is read differently, nothing on the broker changes. tests/daemon/test_hostile_input.py sends each kind through a
real broker.
"""

from __future__ import annotations

from typing import Any

from kafka.errors import CorruptRecordError
from kafka.record import default_records
from kafka.record.util import decode_varint, encode_varint

UNDECODABLE_KEY_PREFIX = "unlearnd.undecodable_key:"
UNDECODABLE_RECORD_HEADER = "unlearnd.undecodable_record"
MAX_ERROR_BYTES = 500


class DecoderHeader(str):
    """A header key this module wrote. kafka-python hands a client's header keys over as plain str, so no client
    can make one: a header a client names like ours is only its own text, and admission does not read it."""

    __slots__ = ()


def written_here(key: str, name: str) -> bool:
    """Whether `key` is a header this module wrote and starts with `name`."""
    return isinstance(key, DecoderHeader) and key.startswith(name)

_installed = False  # the record-batch class is patched once per process
_unreadable: dict[int, str] = {}  # id(batch) -> why it cannot be read; a batch's slots take no attribute of ours


def install() -> None:
    """Idempotent; called by the daemon before it creates its consumer."""
    global _installed
    batch = default_records.DefaultRecordBatch
    if _installed:
        return
    _installed = True
    read_msg, validate_crc, iterate, next_record = batch._read_msg, batch.validate_crc, batch.__iter__, batch.__next__

    # kafka-python is untyped: its batches and records are Any here
    def _read_msg(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = self._pos
        try:
            return read_msg(self, *args, **kwargs)
        except UnicodeDecodeError as exc:
            try:
                end, rewritten, spelled = _with_readable_header_keys(self._buffer, start)
            except (ValueError, IndexError):
                return _placeholder(self, start, exc)
            self._buffer[start:end] = rewritten
            self._pos = start
            record = read_msg(self, *args, **kwargs)
            record._headers = [(DecoderHeader(k) if i in spelled else k, v) for i, (k, v) in enumerate(record._headers)]
            return record
        except (CorruptRecordError, ValueError, IndexError) as exc:
            return _placeholder(self, start, exc)

    def _validate_crc(self: Any) -> bool:
        if not validate_crc(self):
            _unreadable[id(self)] = f"{_offsets(self)} failed its CRC check"
        return True

    def _iter(self: Any) -> Any:
        if id(self) in _unreadable:
            return self  # do not decompress what failed its CRC
        try:
            return iterate(self)  # decompresses the batch, if compressed
        except Exception as exc:  # each codec fails its own way on bytes that are not what it expects
            _unreadable[id(self)] = f"{_offsets(self)} could not be decompressed: {type(exc).__name__}: {exc}"
            return self

    def _next(self: Any) -> Any:
        reason = _unreadable.pop(id(self), None)
        if reason is None:
            return next_record(self)
        self._next_record_index = self._num_records  # nothing else of this batch is read
        self._pos = len(self._buffer)
        return _record(self, self.base_offset, self.first_timestamp, reason)

    batch._read_msg, batch.validate_crc, batch.__iter__, batch.__next__ = _read_msg, _validate_crc, _iter, _next


def _offsets(batch: Any) -> str:
    return f"record batch at offsets {batch.base_offset}..{batch.base_offset + batch.last_offset_delta}"


def _placeholder(batch: Any, start: int, exc: Exception) -> default_records.DefaultRecord:
    """What is left of an unparseable record: its offset and what was wrong. Raises if it cannot even be
    delimited (then nothing after it in the batch can be found either)."""
    buffer = batch._buffer
    try:
        length, body = decode_varint(buffer, start)
        end = body + length
        if length < 3 or end > len(buffer):
            raise ValueError(f"record length {length} does not fit its batch")
        _, pos = decode_varint(buffer, body)  # attributes
        ts_delta, pos = decode_varint(buffer, pos)
        offset_delta, _ = decode_varint(buffer, pos)
    except (ValueError, IndexError) as err:
        raise CorruptRecordError(f"cannot delimit a record of the batch at offset {batch.base_offset}: {err}") from exc
    if not 0 <= offset_delta <= batch.last_offset_delta:  # a corrupt delta must not move the partition's position
        offset_delta = batch._next_record_index
    batch._pos = end
    return _record(batch, batch.base_offset + offset_delta, batch.first_timestamp + ts_delta,
                   f"{type(exc).__name__}: {exc}")


def _record(batch: Any, offset: int, timestamp: int, error: str) -> default_records.DefaultRecord:
    header = (DecoderHeader(UNDECODABLE_RECORD_HEADER), error.encode("utf-8", "replace")[:MAX_ERROR_BYTES])
    return default_records.DefaultRecord(0, offset, timestamp, batch.timestamp_type, None, None, [header])


def _with_readable_header_keys(buffer: bytearray, start: int) -> tuple[int, bytes, set[int]]:
    """(end of the record at `start`, the record re-encoded with every non-UTF-8 header key spelled in hex, the
    positions of the keys spelled so)."""
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
    if count < 0:
        raise ValueError("negative header count")
    encode_varint(count, out.append)
    spelled = set()
    for i in range(count):
        n, pos = decode_varint(buffer, pos)
        key = bytes(buffer[pos:pos + n])
        pos += n
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            key = (UNDECODABLE_KEY_PREFIX + key.hex()).encode()
            spelled.add(i)
        encode_varint(len(key), out.append)
        out += key
        n, pos = decode_varint(buffer, pos)
        encode_varint(n, out.append)
        if n > 0:
            out += buffer[pos:pos + n]
            pos += n
    if pos != end:
        raise ValueError("record length does not match its fields")
    record = bytearray()
    encode_varint(len(out), record.append)
    return end, bytes(record + out), spelled

"""The wire contracts: deletion requests in, result events out.

A request is a UTF-8 JSON object, at most `requests.max_bytes` long::

    {"request_id": "gdpr-2026-0042", "model": "mnist-mlp",
     "forget": {"sample_ids": [17, 42, 99]},
     "method": "iau", "subject": "user-8812", "issued_at": "2026-11-24T09:00:00Z",
     "signature": "<hex HMAC-SHA256 of the canonical body>"}

`forget` holds exactly one of: `sample_ids`, `texts`, `qa` ([{"question", "answer"}]), `class`, `concept`, or
`image` + `mask` (an image id of an images model and the region to erase: {"box": [x0, y0, x1, y1]} or
{"rle": {"size": [h, w], "counts": ...}}). Unknown fields and wrong types are rejected, never guessed at: every
field is strict (pydantic strict mode), so `"1"`, `true`, `1.0` or `" 7 "` where an integer belongs is a `schema`
rejection, not sample 1.
`decode` turns bytes into a `Request` or raises `Rejected` with a `DeadLetterReason`; it raises nothing else
for any input (tests/daemon/test_hostile_input.py holds it to that).

The signature covers the *canonical body*: the object without `signature`, serialised with sorted keys and
no whitespace (`canonical_body`), so any client can sign it with a few lines of code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters.base import Forget, InvalidForget

REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"
MAX_SAMPLE_ID = 2**63 - 1  # what the ledger (SQLite INTEGER) can hold
MAX_DETAIL_CHARS = 1000  # a rejection's detail is bounded: it goes into a header, a result and the ledger


class DeadLetterReason(StrEnum):
    """Why a message went to the dead-letter topic: the `unlearnd.reason` header, the result event's `reason`, the
    ledger's and the `unlearnd_dlq_total` label. The values are a contract (dashboards, alerts, replay tools)."""

    OVERSIZE = "oversize"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    SCHEMA = "schema"
    BAD_SIGNATURE = "bad_signature"
    MISSING_SIGNATURE = "missing_signature"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_METHOD = "unknown_method"
    METHOD_NOT_ALLOWED = "method_not_allowed"  # a known method the model does not serve for this forget kind
    INVALID_FORGET = "invalid_forget"
    REQUEST_ID_CONFLICT = "request_id_conflict"
    ENGINE_FAILED = "engine_failed"
    UNDECODABLE_RECORD = "undecodable_record"
    # Image erasure requests an images model refuses (adapters/images/erasure.py; InvalidForget.reason):
    UNKNOWN_IMAGE = "unknown_image"  # no such image in the model's collection (or not a valid image id)
    WRONG_COLLECTION = "wrong_collection"  # the image belongs to another images model's collection
    INVALID_MASK = "invalid_mask"  # empty, outside the image, the whole image, or unusable on it


def forget_reason(exc: InvalidForget) -> DeadLetterReason:
    """The dead-letter reason of an engine's InvalidForget: the one it names when it is in the closed set,
    else `invalid_forget` (an engine cannot add labels to the metric)."""
    try:
        return DeadLetterReason(exc.reason)
    except ValueError:
        return DeadLetterReason.INVALID_FORGET


class Rejected(Exception):
    """A message that cannot become a request, and why."""

    def __init__(self, reason: DeadLetterReason, detail: str, request_id: str | None = None, model: str | None = None,
                 method: str | None = None, body_sha256: str | None = None):
        """`method`: the method the request named or would have got by default, where it was known (for the
        ledger and the result; a name no engine has stays out of metric labels). `body_sha256`: the digest of the
        body, wherever it was a JSON object (what tells this message from another that reuses its request id)."""
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.request_id = request_id
        self.model = model
        self.method = method
        self.body_sha256 = body_sha256


def _iso8601(value: Any) -> Any:
    """issued_at is an ISO 8601 string and nothing else (strict mode would refuse the string; lax mode would also
    take a number as a Unix time, which is a guess)."""
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time string")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 date-time string") from None


_STRICT = ConfigDict(extra="forbid", strict=True)
SampleId = Annotated[int, Field(ge=0, le=MAX_SAMPLE_ID)]


class QAPair(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class RunLengthMask(BaseModel):
    """COCO run-length encoding (adapters/images/masks.py reads it): counts as run lengths or COCO's string."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    size: list[Annotated[int, Field(ge=1, le=1 << 16)]] = Field(min_length=2, max_length=2)
    counts: list[Annotated[int, Field(ge=0, le=1 << 32)]] | str = Field(min_length=1)


class MaskSpec(BaseModel):
    """The region of `forget.image` to erase: exactly one of a box [x0, y0, x1, y1] (ends exclusive) or an RLE.
    Whether it fits the image (empty, outside, the whole image) is the engine's check: `invalid_mask`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    box: list[int] | None = Field(None, min_length=4, max_length=4)
    rle: RunLengthMask | None = None

    @model_validator(mode="after")
    def _one_form(self) -> MaskSpec:
        if (self.box is None) == (self.rle is None):
            raise ValueError("mask must hold exactly one of box or rle")
        return self

    def canonical(self) -> str:
        """The mask as compact JSON text (what an engine parses; hashable inside a Forget)."""
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))


class ForgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    sample_ids: list[SampleId] | None = Field(None, min_length=1)
    texts: list[str] | None = Field(None, min_length=1)
    qa: list[QAPair] | None = Field(None, min_length=1)
    class_: int | None = Field(None, alias="class", ge=0, le=2**31 - 1)
    concept: str | None = Field(None, min_length=1)
    image: str | None = Field(None, min_length=1, max_length=128)
    mask: MaskSpec | None = None

    @field_validator("sample_ids")
    @classmethod
    def _distinct(cls, ids: list[int] | None) -> list[int] | None:
        """An id named twice is one sample: forgotten once, counted once (in the ledger's forget_count too)."""
        return None if ids is None else list(dict.fromkeys(ids))

    @model_validator(mode="after")
    def _exactly_one(self) -> ForgetSpec:
        given = [name for name in ("sample_ids", "texts", "qa", "class_", "concept", "image")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("forget must hold exactly one of sample_ids, texts, qa, class, concept, image+mask; "
                             f"got {[g.rstrip('_') for g in given] or 'none'}")
        if (self.image is None) != (self.mask is None):
            raise ValueError("forget.image and forget.mask go together")
        return self

    def size(self) -> int:
        for items in (self.sample_ids, self.texts, self.qa):
            if items is not None:
                return len(items)
        return 1

    def to_forget(self) -> Forget:
        return Forget(
            sample_ids=tuple(self.sample_ids or ()),
            texts=tuple(self.texts or ()),
            qa=tuple((p.question, p.answer) for p in self.qa or ()),
            class_label=self.class_,
            concept=self.concept,
            image=self.image,
            mask=self.mask.canonical() if self.mask is not None else None,
        )


class Request(BaseModel):
    model_config = _STRICT
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    model: str = Field(min_length=1, max_length=128)
    forget: ForgetSpec
    method: str | None = Field(None, min_length=1, max_length=64)
    subject: str | None = Field(None, max_length=256)
    issued_at: Annotated[datetime | None, BeforeValidator(_iso8601)] = None
    signature: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")


def canonical_body(obj: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the request without `signature`, sorted keys, no whitespace, UTF-8."""
    body = {k: v for k, v in obj.items() if k != "signature"}
    # surrogatepass: a body holding a lone surrogate escape (refused, never signed) still has a digest to file it by
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


def sign(obj: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical_body(obj), hashlib.sha256).hexdigest()


def body_sha256(obj: dict[str, Any]) -> str:
    """Identity of a request's content (dedupe conflicts, audit) without storing the content itself."""
    return hashlib.sha256(canonical_body(obj)).hexdigest()


def decode(raw: bytes | None, *, max_bytes: int, hmac_key: bytes | None) -> tuple[Request, str]:
    """Bytes -> (Request, body hash). Raises Rejected with the first problem found, and nothing else."""
    if raw is None:
        raise Rejected(DeadLetterReason.INVALID_JSON, "empty message (tombstone)")
    if len(raw) > max_bytes:
        raise Rejected(DeadLetterReason.OVERSIZE, f"{len(raw)} bytes > requests.max_bytes = {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(DeadLetterReason.INVALID_UTF8, f"not UTF-8 at byte {exc.start}") from None
    # A byte order mark, which some Windows tools write before UTF-8 text: RFC 8259 lets a parser ignore it.
    obj = _parse_json(text.removeprefix("\ufeff"))
    if not isinstance(obj, dict):
        raise Rejected(DeadLetterReason.INVALID_JSON, f"expected a JSON object, got {type(obj).__name__}")
    request_id, model = _request_id_label(obj.get("request_id")), _model_label(obj.get("model"))
    digest = _digest(obj)
    if digest is None:
        raise Rejected(DeadLetterReason.INVALID_JSON, "nested too deeply")
    # Valid UTF-8 bytes can still spell a lone surrogate (a "\ud800" escape): not Unicode, and neither SQLite nor
    # Kafka headers can store it. Refused here, before anything is written anywhere.
    if not _is_unicode(obj):
        raise Rejected(DeadLetterReason.SCHEMA, "a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): "
                       "not valid Unicode", request_id, model, body_sha256=digest)
    try:
        request = Request.model_validate(obj)
    except ValidationError as exc:
        raise Rejected(DeadLetterReason.SCHEMA, _describe(exc), request_id, model, body_sha256=digest) from None
    if hmac_key is not None:
        if request.signature is None:
            raise Rejected(DeadLetterReason.MISSING_SIGNATURE, "signatures are required (an HMAC key is configured)",
                           request_id, model, body_sha256=digest)
        if not hmac.compare_digest(sign(obj, hmac_key), request.signature.lower()):
            raise Rejected(DeadLetterReason.BAD_SIGNATURE, "HMAC-SHA256 of the canonical body does not match",
                           request_id, model, body_sha256=digest)
    return request, digest


def _digest(obj: dict[str, Any]) -> str | None:
    try:
        return body_sha256(obj)
    except (RecursionError, ValueError):  # cannot happen for what json.loads returned; no digest rather than raise
        return None


def _parse_json(text: str) -> Any:
    """Strict JSON (RFC 8259): no NaN/Infinity, no duplicate keys (two readers could see two different requests);
    nesting or numbers Python cannot hold are refused, not raised."""
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise Rejected(DeadLetterReason.INVALID_JSON, f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise Rejected(DeadLetterReason.INVALID_JSON, "nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal over Python's 4,300-digit limit
        raise Rejected(DeadLetterReason.INVALID_JSON, _bounded(str(exc))) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("an object repeats a key")
    return obj


def _is_unicode(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    except (RecursionError, ValueError):  # cannot happen for what json.loads returned; refuse rather than raise
        return False
    return True


def _request_id_label(value: Any) -> str | None:
    """The request id to file a rejection under: only one that is itself valid (ASCII, bounded)."""
    return value if isinstance(value, str) and re.fullmatch(REQUEST_ID_PATTERN, value) else None


def _model_label(value: Any) -> str | None:
    # isprintable() is False for surrogates and control characters: the label is safe to store, log and send.
    return value if isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable() else None


def _describe(exc: ValidationError) -> str:
    # Field paths and messages only: pydantic's default text echoes input values, which may be forget data.
    return _bounded("; ".join(f"{'.'.join(str(part)[:64] for part in e['loc']) or '(body)'}: {e['msg']}"
                              for e in exc.errors()[:5]))


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


class Result(BaseModel):
    """One result event per request on the results topic (and the ledger's record of it)."""

    request_id: str | None
    model: str | None
    # rolled_back: the answer to a request sent again after an operator's rollback undid what it applied
    status: Literal["applied", "rejected", "failed", "rolled_back"]
    method: str | None = None
    version: str | None = None
    adapter_id: str | None = None
    metrics: dict[str, float] = {}
    duration_s: float | None = None
    error: str | None = None
    reason: str | None = None
    subject: str | None = None
    # SHA-256 of the canonical body of the message this answers (null where the body was no JSON object): tells a
    # request's own result from one for another message that reused its request id.
    body_sha256: str | None = None
    # False when the request was already satisfied (every named sample already forgotten): applied, no new
    # version, `version` is the current head. Absent for other outcomes.
    changed: bool | None = None
    # An image erasure's receipt: the erasure artifact, the image id, the SHA-256 of the source file, of the
    # result file and of the mask, the mask's pixel count and box, and (when applied now) whether the original
    # was deleted or retained. Absent otherwise.
    receipt: dict[str, Any] | None = None
    completed_at: datetime

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

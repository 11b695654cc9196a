"""The wire contracts: deletion requests in, result events out.

A request is a UTF-8 JSON object, at most `requests.max_bytes` long::

    {"request_id": "gdpr-2026-0042", "model": "mnist-mlp",
     "forget": {"sample_ids": [17, 42, 99]},
     "method": "iau", "subject": "user-8812", "issued_at": "2026-11-24T09:00:00Z",
     "signature": "<hex HMAC-SHA256 of the canonical body>"}

`forget` holds exactly one of: `sample_ids`, `texts`, `qa` ([{"question", "answer"}]), `class`, `concept`, or
`image` + `mask`. Unknown fields and wrong types are rejected, never guessed at. `decode` turns bytes into a
`Request` or raises `Rejected` with a reason from `metrics.DLQ_REASONS`.

The signature covers the *canonical body*: the object without `signature`, serialised with sorted keys and
no whitespace (`canonical_body`), so any client can sign it with a few lines of code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapters.base import Forget

REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"


class Rejected(Exception):
    """A message that cannot become a request. `reason` is a bounded code (a metrics label)."""

    def __init__(self, reason: str, detail: str, request_id: str | None = None, model: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.request_id = request_id
        self.model = model


class QAPair(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class ForgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    sample_ids: list[int] | None = Field(None, min_length=1)
    texts: list[str] | None = Field(None, min_length=1)
    qa: list[QAPair] | None = Field(None, min_length=1)
    class_: int | None = Field(None, alias="class", ge=0)
    concept: str | None = Field(None, min_length=1)
    image: str | None = Field(None, min_length=1)
    mask: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> "ForgetSpec":
        given = [name for name in ("sample_ids", "texts", "qa", "class_", "concept", "image")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("forget must hold exactly one of sample_ids, texts, qa, class, concept, image+mask; "
                             f"got {[g.rstrip('_') for g in given] or 'none'}")
        if (self.image is None) != (self.mask is None):
            raise ValueError("forget.image and forget.mask go together")
        if self.sample_ids is not None and min(self.sample_ids) < 0:
            raise ValueError("forget.sample_ids must be >= 0")
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
            mask=self.mask,
        )


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    model: str = Field(min_length=1, max_length=128)
    forget: ForgetSpec
    method: str | None = Field(None, min_length=1, max_length=64)
    subject: str | None = Field(None, max_length=256)
    issued_at: datetime | None = None
    signature: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")


def canonical_body(obj: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the request without `signature`, sorted keys, no whitespace, UTF-8."""
    body = {k: v for k, v in obj.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(obj: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical_body(obj), hashlib.sha256).hexdigest()


def body_sha256(obj: dict[str, Any]) -> str:
    """Identity of a request's content (dedupe conflicts, audit) without storing the content itself."""
    return hashlib.sha256(canonical_body(obj)).hexdigest()


def decode(raw: bytes | None, *, max_bytes: int, hmac_key: bytes | None) -> tuple[Request, str]:
    """Bytes -> (Request, body hash). Raises Rejected with the first problem found."""
    if raw is None:
        raise Rejected("invalid_json", "empty message (tombstone)")
    if len(raw) > max_bytes:
        raise Rejected("oversize", f"{len(raw)} bytes > requests.max_bytes = {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", f"not UTF-8 at byte {exc.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Rejected("invalid_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise Rejected("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
    request_id = obj.get("request_id") if isinstance(obj.get("request_id"), str) else None
    model = obj.get("model") if isinstance(obj.get("model"), str) else None
    try:
        request = Request.model_validate(obj)
    except ValidationError as exc:
        raise Rejected("schema", _describe(exc), request_id, model) from None
    if hmac_key is not None:
        if request.signature is None:
            raise Rejected("missing_signature", "signatures are required (an HMAC key is configured)", request_id, model)
        if not hmac.compare_digest(sign(obj, hmac_key), request.signature.lower()):
            raise Rejected("bad_signature", "HMAC-SHA256 of the canonical body does not match", request_id, model)
    return request, body_sha256(obj)


def _describe(exc: ValidationError) -> str:
    # Field paths and messages only: pydantic's default text echoes input values, which may be forget data.
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in exc.errors()[:5])


class Result(BaseModel):
    """One result event per request on the results topic (and the ledger's record of it)."""

    request_id: str | None
    model: str | None
    status: Literal["applied", "rejected", "failed"]
    method: str | None = None
    version: str | None = None
    adapter_id: str | None = None
    metrics: dict[str, float] = {}
    duration_s: float | None = None
    error: str | None = None
    reason: str | None = None
    subject: str | None = None
    completed_at: datetime

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

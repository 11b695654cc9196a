"""The OpenAI-compatible surface of `unlearnd serve`: request bodies and response objects, as vLLM serves them.

    POST /v1/chat/completions   messages rendered with the tokenizer's chat template; "stream": true for SSE
    POST /v1/completions        a raw prompt (or a list of them); "stream": true for SSE
    GET  /v1/models             the base model, then every active adapter with its lineage (parent, root)

Every response (and the first chunk of a stream) carries one extra field, `unlearnd`: the adapters applied to
it, each with the weight it was applied at (1.0: full strength) and its gate's weight, e.g.
`{"adapters": [{"id": "a0000", "weight": 1.0, "gate_weight": 0.93}]}`; `[]` = the base model answered. Clients
that do not know the field ignore it (the official `openai` client keeps it in `model_extra`).

Sampling: `temperature` and `top_p` as in OpenAI's API; left out, the model's generation_config decides
(SmolLM2: greedy, like vLLM's default). `n` > 1, `logprobs`, tools and response formats are refused (400).

Input limits, each a 400 before anything runs: the text of a request (a chat's message contents, a completion's
prompts, a route's texts) at most MAX_PROMPT_CHARS characters, every string valid Unicode (JSON can carry a lone
surrogate, which no tokenizer can encode), and `seed` within the 64-bit range a generator takes. A prompt longer
than the model's context, counted in tokens, is refused by the server (`context_length_exceeded`). Content parts are
text only (the model reads no image or audio). A body's size is capped before it is parsed (daemon/body_limit.py).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from detector.inputs import TEXT_PARTS
from detector.routed_model import Completion, Routing, Sampling

MAX_TOKENS = 4096
MAX_PROMPT_CHARS = 100_000
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's API takes up to 4 stop strings
MAX_ITEMS = 256  # messages of a chat, prompts of a completion, texts of a route: one request's list
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


def _invalid_unicode(value: Any) -> bool:
    """Whether a JSON value holds a string with a lone surrogate (valid JSON, not encodable as UTF-8). Walked
    with a stack, not recursion: a body may nest as deep as the JSON parser allows."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


class _Request(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)  # NaN or Infinity (which Python's JSON parser takes) is a 400

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if _invalid_unicode(data):
            raise ValueError("text must be valid Unicode: a lone surrogate (such as \\ud800) cannot be encoded")
        return data


class _Body(_Request):
    # Fields of OpenAI's API we do not act on (user, presence_penalty, ...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | int | None = Field(None, description="not supported")

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, not {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return stop

    def sampling(self, default_max_tokens: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(max_new_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                        top_p=self.top_p, seed=self.seed, stop=tuple(s for s in stop if s))

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # function: tool's old name
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        """A string, null, or a list of text parts: the model reads text only, so an image or audio part is refused
        rather than dropped (the answer would be to a question the user did not ask)."""
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError("must be a string, a list of content parts, or null")
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str) or kind not in TEXT_PARTS:
                shown = repr(kind[:40]) if isinstance(kind, str) else "none"
                raise ValueError(f"part {i}: this model reads text only: content part type {shown} is not supported"
                                 f" (types: {', '.join(TEXT_PARTS)})")
            if not isinstance(part.get(TEXT_PARTS[kind]), str):
                raise ValueError(f"part {i}: a {kind} part needs a string `{TEXT_PARTS[kind]}`")
        return content

    def text_length(self) -> int:
        """Characters of text in the message: its content, or its text parts."""
        if isinstance(self.content, str):
            return len(self.content)
        return sum(len(p[TEXT_PARTS[p["type"]]]) for p in self.content or [])


class ChatCompletionBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_ITEMS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    tools: list[Any] | None = Field(None, description="not supported")

    @model_validator(mode="after")
    def _bounded(self) -> ChatCompletionBody:
        if sum(m.text_length() for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages: at most {MAX_PROMPT_CHARS} characters of text in all")
        return self

    def sampling(self, default_max_tokens: int) -> Sampling:
        s = super().sampling(default_max_tokens)
        if self.max_completion_tokens:
            s.max_new_tokens = self.max_completion_tokens
        return s


class CompletionBody(_Body):
    prompt: str | list[str] = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def _few_prompts(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) > MAX_ITEMS:
            raise ValueError(f"at most {MAX_ITEMS} prompts in one request, not {len(prompt)}")
        return prompt
    echo: bool = False


class RouteBody(_Request):
    texts: list[str] | None = Field(None, min_length=1, max_length=MAX_ITEMS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_ITEMS)

    @model_validator(mode="after")
    def _bounded(self) -> RouteBody:
        length = sum(map(len, self.texts or [])) + sum(m.text_length() for m in self.messages or [])
        if length > MAX_PROMPT_CHARS:
            raise ValueError(f"at most {MAX_PROMPT_CHARS} characters of text in all")
        return self


def unsupported(body: _Body) -> str | None:
    """Why a body asks for something this server does not do, or None."""
    if body.logprobs:
        return "logprobs are not supported"
    if getattr(body, "tools", None):
        return "tools are not supported"
    return None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def extra(routing: Routing) -> dict[str, Any]:
    return {"adapters": routing.report()}


def usage(completions: list[Completion]) -> dict[str, Any]:
    p = sum(c.prompt_tokens for c in completions)
    c = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def chat_response(model: str, c: Completion) -> dict[str, Any]:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                         "finish_reason": c.finish_reason}],
            "usage": usage([c]), "unlearnd": extra(c.routing)}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
               **more: Any) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **more}


def completion_response(model: str, completions: list[Completion], texts: list[str]) -> dict[str, Any]:
    union = Routing({a: w for c in completions for a, w in c.routing.gate_weights.items()})
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": c.finish_reason, "unlearnd": extra(c.routing)}
            for i, (c, t) in enumerate(zip(completions, texts, strict=True))
        ],
        "usage": usage(completions),
        "unlearnd": extra(union),
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     **more: Any) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}], **more}


def model_card(model_id: str, *, root: str, parent: str | None, created: float) -> dict[str, Any]:
    """One entry of /v1/models, shaped like vLLM's (a LoRA adapter's `parent` is its base model)."""
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": "unlearnd", "root": root,
            "parent": parent, "permission": []}


def error(message: str, *, kind: str = "invalid_request_error", code: int = 400,
          param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

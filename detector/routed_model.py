"""A causal LM served through the router: each request gets exactly the unlearning adapters routed to it, at
full strength; a request routed to none runs the base weights, token for token what the base model says.

Why full strength: O3 scales an adapter's output by its gate's soft weight w, and most held-out paraphrases get
w of 0.5-0.6; on SmolLM2 the forgotten answers leaked at those weights and were gone at 1 (ALGORITHMS.md, "In
serving"). The adapters are not specific on their own (forced on, they also erase look-alike facts), so all the
specificity is the router's: it decides whether an adapter applies, and once it does, it applies fully. The gate
weights stay in every `Routing` for observability.

One object owns the model, its loaded adapters and the router, behind one lock (adapters are model state; a
generation must see one consistent set). Used by `unlearnd serve`, by the daemon's result measures
(adapters/lm/measures.py) and by the benchmarks, so what they measure is what users get.

    routed = RoutedModel(model, tokenizer, Router(Encoder()))
    routed.add_adapter("a0000", adapter_dir)              # PEFT layout, with its gate in adapter_dir / "gate"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    routing = routed.route_chat(messages)                 # Routing(gate_weights={"a0000": 0.97}, ...)
    routed.generate(routed.chat_prompt(messages), routing, max_new_tokens=32).text
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.devices import device_of
from detector.gate import GATE_SUBDIR
from detector.inputs import chat_routing_texts, content_text, prompt_routing_texts
from detector.per_sample_lora import per_sample_adapters
from detector.router import Router
from detector.text_stream import TextStream, first_stop, stop_at_strings, stop_when

FULL_STRENGTH = 1.0
_SWAP = "unlearnd_swap"  # transient adapter name while the only loaded adapter is replaced


@dataclass
class Routing:
    """The router's decision for one serving request."""

    gate_weights: dict[str, float] = field(default_factory=dict)  # adapter id -> its gate's weight
    texts: int = 0  # how many texts of the request were routed (detector.inputs)

    @property
    def applied(self) -> dict[str, float]:
        """Adapter id -> the strength it is applied at: every routed adapter at full strength."""
        return dict.fromkeys(sorted(self.gate_weights), FULL_STRENGTH)

    def report(self) -> list[dict]:
        """What a response says about its adapters: id, applied weight, gate weight."""
        return [{"id": a, "weight": FULL_STRENGTH, "gate_weight": round(float(self.gate_weights[a]), 4)}
                for a in sorted(self.gate_weights)]


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    routing: Routing
    seconds: float


@dataclass
class Sampling:
    """Decoding settings of one request. `temperature` None = the model's generation_config (greedy for
    SmolLM2); 0 = greedy; > 0 samples, reproducibly when `seed` is given."""

    max_new_tokens: int = 64
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def generate_kwargs(self, model) -> dict:
        kw: dict = {"max_new_tokens": self.max_new_tokens}
        if self.temperature is not None:
            kw["do_sample"] = self.temperature > 0
        sample = kw.get("do_sample", bool(getattr(model.generation_config, "do_sample", False)))
        if sample:
            if self.temperature:
                kw["temperature"] = self.temperature
            if self.top_p is not None:
                kw["top_p"] = self.top_p
        else:  # silence generation_config's sampling defaults that greedy decoding ignores
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


class PromptTooLong(ValueError):
    """The prompt and the tokens asked for do not fit the model's context."""


class RoutedModel:
    def __init__(self, model, tokenizer, router: Router, *, context_turns: int = 1):
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # plain transformers model; a peft PeftModel once an adapter is loaded; None routes only (lazy adapters)
        self.model = model
        self.tokenizer = tokenizer
        self.router = router
        self.context_turns = context_turns
        self.adapters: dict[str, Path] = {}  # adapter id -> its directory, LoRA loaded in `model`
        self._pending: dict[str, Path] = {}  # routable adapters whose LoRA weights load on first use
        self.lock = threading.RLock()

    # --- adapters ----------------------------------------------------------------------------------
    def add_adapter(self, adapter_id: str, path: str | Path, *, lazy: bool = False) -> None:
        """Load a PEFT adapter and its gate (`path / GATE_SUBDIR`); replaces a loaded one of that id.
        `lazy`: the gate now, the LoRA weights only when an input is first routed to it (the daemon's measures
        route a few questions through every active gate but need the weights of those they reach only)."""
        path = Path(path)
        with self.lock:
            self.remove_adapter(adapter_id)
            self.router.add(adapter_id, path / GATE_SUBDIR)
            self._pending[adapter_id] = path
            if not lazy:
                self._load_pending([adapter_id])

    def _load_pending(self, adapter_ids) -> None:
        from peft import PeftModel

        for adapter_id in adapter_ids:
            path = self._pending.pop(adapter_id, None)
            if path is None:
                continue
            if isinstance(self.model, PeftModel):
                stale = adapter_id in self.model.peft_config  # peft keeps a model's last adapter: swap it out
                if stale:
                    self.model.load_adapter(str(path), adapter_name=_SWAP)
                    self._delete_adapter(adapter_id)
                self.model.load_adapter(str(path), adapter_name=adapter_id)
                if stale:
                    self._delete_adapter(_SWAP)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=adapter_id)
            self.model.eval()
            self.adapters[adapter_id] = path

    def remove_adapter(self, adapter_id: str) -> bool:
        """Stop routing to an adapter and drop its LoRA weights; returns whether it was known."""
        with self.lock:
            self.router.remove(adapter_id)  # first: no input is routed to it from now on
            pending = self._pending.pop(adapter_id, None) is not None
            if self.adapters.pop(adapter_id, None) is None:
                return pending
            # peft cannot delete a model's last adapter: it stays loaded, and the router never selects it.
            if len(self.model.peft_config) > 1:
                self._delete_adapter(adapter_id)
            return True

    def _delete_adapter(self, adapter_id: str) -> None:
        """peft's delete_adapter, without its warning that the active adapter moved when the deleted one was
        active: expected here, where the router sets the active adapters for every input."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted", UserWarning)
            self.model.delete_adapter(adapter_id)

    @property
    def routable(self) -> list[str]:
        """Adapters the router can send inputs to (loaded, or loaded on first use)."""
        return sorted(self.router.gates)

    def release(self) -> torch.nn.Module:
        """Remove every LoRA layer and return the plain base model (weights untouched)."""
        from peft import PeftModel

        with self.lock:
            for adapter_id in list(self.router.gates):
                self.router.remove(adapter_id)
            self.adapters.clear()
            self._pending.clear()
            if isinstance(self.model, PeftModel):
                self.model = self.model.unload()
            return self.model

    # --- what the router sees ----------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, messages: Sequence[dict]) -> str:
        """`messages` rendered with the tokenizer's chat template, ready for the assistant's turn."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; use completions")
        plain = [{"role": m["role"], "content": content_text(m.get("content"))} for m in messages]
        return self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)

    def route_texts(self, texts: list[str]) -> Routing:
        return self.route_many([texts])[0]

    def route_many(self, texts_per_input: list[list[str]]) -> list[Routing]:
        """One Routing per input given as its texts to route (one encoder pass for all)."""
        return [
            Routing(w, len(t))
            for w, t in zip(self.router.route_requests(texts_per_input), texts_per_input, strict=True)
        ]

    def chat_texts(self, messages: Sequence[dict]) -> list[str]:
        """What the router sees of a chat request: every turn, and the last user turn in context (detector.inputs)."""
        return chat_routing_texts(messages, context_turns=self.context_turns)

    def prompt_texts(self, prompt: str) -> list[str]:
        """What the router sees of a raw prompt: its user turns or questions, else itself (detector.inputs)."""
        return prompt_routing_texts(prompt, context_turns=self.context_turns)

    def route_chat(self, messages: Sequence[dict]) -> Routing:
        return self.route_texts(self.chat_texts(messages))

    def route_prompt(self, prompt: str) -> Routing:
        return self.route_texts(self.prompt_texts(prompt))

    # --- generation ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the served model's weights are (the CPU while it routes only): inputs go there."""
        return device_of(self.model) if self.model is not None else torch.device("cpu")

    @property
    def context_length(self) -> int | None:
        """The most positions (prompt and new tokens) the model takes, where its config says."""
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    def _encode(self, prompt: str, templated: bool, max_new_tokens: int | None = None) -> dict:
        """The prompt's token ids on the model's device. With `max_new_tokens`: PromptTooLong where the prompt and
        that many new tokens exceed the model's context (a model run past it degrades or fails, slowly)."""
        # A rendered chat template carries its own special tokens; a raw prompt gets the tokenizer's (as vLLM).
        ids = self.tokenizer(prompt, return_tensors="pt", return_token_type_ids=False, add_special_tokens=not templated)
        n, limit = int(ids["input_ids"].shape[1]), self.context_length
        if max_new_tokens is not None and limit is not None and n + max_new_tokens > limit:
            raise PromptTooLong(f"this model's maximum context length is {limit} tokens; the prompt has {n} and "
                                f"{max_new_tokens} more were asked for")
        return {k: v.to(self.device) for k, v in ids.items()}

    def _adapters_context(self, routes: Sequence[dict[str, float]], *, merge: bool = True):
        """Within it, the model runs sample b with routes[b]'s adapters (the caller holds `lock`). `merge`: a
        batch sharing one route runs on merged weights (for generations; scoring runs a pass or two: False)."""
        from contextlib import nullcontext

        from peft import PeftModel

        with torch.inference_mode(False):  # weights loaded inside a generation must stay ordinary tensors
            self._load_pending({name for r in routes for name in r})
        if not isinstance(self.model, PeftModel):
            return nullcontext()  # no adapter loaded yet: the base model itself
        return per_sample_adapters(self.model, routes, merge=merge)

    def generate(self, prompt: str, routing: Routing, sampling: Sampling | None = None, *,
                 templated: bool = True, cancel: threading.Event | None = None) -> Completion:
        """One completion of `prompt` with `routing`'s adapters at full strength (none: the base model).
        `templated`: the prompt is a rendered chat template (it carries its own special tokens). `cancel`, once
        set, ends the generation at its next token (a client that went away). PromptTooLong where the prompt
        and `sampling.max_new_tokens` exceed the model's context."""
        sampling = sampling or Sampling()
        t0 = time.perf_counter()
        ids = self._encode(prompt, templated, sampling.max_new_tokens)
        extra = {"stopping_criteria": stop_when(cancel)} if cancel is not None else {}
        out = self._generate_ids(ids, routing, sampling, **extra)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = first_stop(text, sampling.stop)
        return self._completion(text if cut < 0 else text[:cut], cut >= 0, ids, new, routing, sampling, t0)

    def stream(self, prompt: str, routing: Routing, sampling: Sampling | None = None, *,
               templated: bool = True) -> TextStream:
        """Like `generate`, as text pieces while they are decoded; `.completion` once exhausted."""
        return TextStream(self, prompt, routing, sampling or Sampling(), templated)

    @torch.inference_mode()
    def _generate_ids(self, ids: dict, routing: Routing, sampling: Sampling, **extra) -> torch.Tensor:
        tok = self.tokenizer
        if sampling.stop:
            from transformers import StoppingCriteriaList

            extra["stopping_criteria"] = StoppingCriteriaList(
                [*extra.get("stopping_criteria", ()), stop_at_strings(tok, ids["input_ids"].shape[1], sampling.stop)])
        with self.lock, self._adapters_context([routing.applied]):
            kw = sampling.generate_kwargs(self.model)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            return self.model.generate(**ids, pad_token_id=tok.pad_token_id, **kw, **extra)

    def _completion(self, text: str, stopped: bool, ids: dict, new: list[int], routing: Routing,
                    sampling: Sampling, t0: float) -> Completion:
        ends = {self.tokenizer.eos_token_id} | set(_as_list(self.model.generation_config.eos_token_id))
        ended = stopped or bool(new and new[-1] in ends) or len(new) < sampling.max_new_tokens
        return Completion(text, "stop" if ended else "length", int(ids["input_ids"].shape[1]), len(new), routing,
                          time.perf_counter() - t0)

    @torch.inference_mode()
    def generate_batch(self, prompts: list[str], routings: list[Routing], *, max_new_tokens: int,
                       templated: bool = True, num_return_sequences: int = 1, do_sample: bool = False,
                       seed: int = 0, batch_size: int = 16) -> list[list[str]]:
        """Per prompt, `num_return_sequences` completions (greedy, or sampled with `seed`), left-padded batches
        with mixed routes (per_sample_adapters). For measures and benchmarks; serving generates one request at
        a time, unpadded."""
        tok = self.tokenizer
        out: list[list[str]] = []
        side = tok.padding_side
        with self.lock:
            tok.padding_side = "left"
            try:
                for i in range(0, len(prompts), batch_size):
                    chunk = prompts[i:i + batch_size]
                    routes = [r.applied for r in routings[i:i + batch_size]]
                    ids = tok(chunk, return_tensors="pt", padding=True, return_token_type_ids=False,
                              add_special_tokens=not templated).to(self.device)
                    if do_sample:
                        torch.manual_seed(seed + i)
                    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if do_sample else \
                        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
                    with self._adapters_context(routes):
                        gen = self.model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                                  num_return_sequences=num_return_sequences, **sampling)
                    texts = tok.batch_decode(gen[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)
                    out += [texts[j:j + num_return_sequences] for j in range(0, len(texts), num_return_sequences)]
            finally:
                tok.padding_side = side
        return out

    @torch.inference_mode()
    def answer_scores(self, prompts: list[str], routings: list[Routing], candidates: list[tuple[str, ...]], *,
                      sep: str = "") -> list[list[float]]:
        """Mean log-prob per token of each candidate answer after its prompt, with the prompt's routing applied
        (adapters.lm.scoring, through the adapters serving would apply)."""
        from adapters.lm import scoring

        out: list[list[float]] = []
        with self.lock:
            for prompt, routing, cands in zip(
                prompts, routings, candidates, strict=True
            ):  # one prompt: any number of candidates
                with self._adapters_context([routing.applied], merge=False):  # two forward passes: no merge
                    out += scoring.candidate_scores(self.model, self.tokenizer, [prompt], [cands], sep=sep)
        return out


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]

"""O3 for causal LMs: one new LoRA adapter per deletion request, orthogonal to every earlier request's adapter.

Paper: "Practical Unlearning for Large Language Models" (arXiv 2407.10223, v2 ICLR 2025). ALGORITHMS.md, O3.

What we follow: LoRA r=8, alpha=16, dropout 0.05 on q,k,v,o,gate,up,down; next-token cross-entropy on a
*randomly relabelled* copy of the forget set (no gradient ascent, no KL, no retained data); plus
``lambda * mean_over_layers( sum_modules sum_i ||A_i A_t^T||_F^2 )`` over the frozen `lora_A` of all earlier
adapters (the released code's all-earlier variant), lambda = 0.1; one batched product per module shape
(adapters.lm.penalty).

Where we deliberately differ, and why:
- One new adapter per request, trained on the *base* model (earlier adapters off), as O-LoRA does, instead
  of the code's single cumulative LoRA: each request can be inspected, exported and rolled back on its own.
- Loss on the answer tokens only (the code also trains on the prompt): prompt loss spends the adapter on
  re-learning question templates that retained questions share, which would leak into retained inputs.
- Scaled to a ~20-pair request on CPU: the paper's lr 3e-4 x 10-15 epochs at effective batch 128 is about
  1-2 optimizer steps per epoch here, which does not move a 20-pair adapter; we use batch 8 and lr 1e-3 for
  a few epochs (~15 steps), which does (measured in bench/o3.py).
- Random labels for free-form QA (the analogue of a random multiple-choice letter): each answer is replaced
  by a random wrong answer of the same shape from `LMTarget.answer_pool` (default `DEFAULT_POOL`), never by
  one of the request's own answers (see `_random_labels`). `objective =
  "refusal"` trains the target ``refusal_text`` instead. `forget.texts` are split at the middle word into
  prompt and continuation; the continuation is relabelled the same way.
- Questions are trained in the layouts users ask them in: the model's chat template (what
  `/v1/chat/completions` renders) and the plain `Question: ...\nAnswer:` completion layout (bench.evaluation.facts), one
  relabelled answer per question in both. An adapter trained on one layout only did not carry over to the other.

What the detector is fitted on is `gate_texts(forget)`: the request's questions (or texts) as users send them,
the same forms `detector.inputs` extracts from serving requests. Requests with fewer than
`detector.gate.MIN_GATE_TEXTS` distinct ones are refused before training (`validate`): no sound gate comes from them.

The engine never persists anything: `AdapterChange.save` writes PEFT's own layout, `AdapterChange.fit_gate` the
request's gate into the adapter's `GATE_SUBDIR`, and the daemon's artifact store makes both durable. The raw forget
text stays in memory (`AdapterChange.forget_texts`) for the gate only.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import string
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

from adapters.base import Change, Engine, Forget, InvalidForget, check_fields, register
from adapters.lm import loading as lm
from adapters.lm import lora_set
from adapters.lm import training as lm_train
from adapters.lm.measures import ForgetItems
from adapters.lm.penalty import batched_penalty
from adapters.lm.random_labels import DEFAULT_POOL
from detector.gate import GATE_SUBDIR, MIN_GATE_TEXTS, UnsoundGate

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class O3Config:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = LLAMA_LINEAR  # module names; ("all-linear",) lets peft pick every linear layer
    lr: float = 1e-3
    # 10 (O3's code: 10-15): on SmolLM2, half as many left forgotten answers well above the never-taught reference
    # (bench/o3.py).
    epochs: int = 10
    batch_size: int = 8
    orthogonality: float = 0.1  # lambda; 0 turns the penalty off
    objective: Literal["random_label", "refusal"] = "random_label"
    refusal_text: str = "I don't know."
    seed: int = 0
    max_length: int = 128  # tokens per prompt+answer row (a chat template's system turn included)
    # Result-event measures through the router, as serving answers (adapters/lm/measures.py): a few seconds.
    measure: bool = True

    def __post_init__(self) -> None:
        check_fields(self, positive=("rank", "alpha", "lr", "epochs", "batch_size", "max_length"),
                     fractions=("dropout",))
        if self.orthogonality < 0:
            raise ValueError(f"orthogonality: must be >= 0, not {self.orthogonality!r}")


@dataclass
class LMTarget:
    """A causal LM as it is now: its base directory and the adapters already active on it.

    `adapters` (id -> PEFT directory) are the earlier requests whose `lora_A` the new adapter must be
    orthogonal to. `model`/`tokenizer` are loaded from `base_dir` on first use and reused across requests;
    the engine injects LoRA layers into `model` during a request and removes them afterwards (base weights are
    never changed), so one target must not serve two requests at the same time.
    """

    name: str
    base_dir: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    answer_pool: tuple[str, ...] = ()  # random-label answers for this model; empty = DEFAULT_POOL
    device: str = "cpu"  # adapters.devices names; where the model is loaded and trained
    dtype: str = "float32"
    model: Any = None  # a transformers causal LM once loaded
    tokenizer: Any = None

    def load(self) -> LMTarget:
        if self.model is None:
            self.model, self.tokenizer = lm.load(self.base_dir, device=self.device, dtype=self.dtype)
        return self

    def earlier_lora_A(self) -> list[dict[str, torch.Tensor]]:
        return [lora_set.read_lora_A(path) for path in self.adapters.values()]


class AdapterChange(Change):
    """A new LoRA adapter (PEFT layout). Rollback = deactivate it; the base and other adapters are untouched.

    `forget_texts` (what the gate is fitted on, `gate_texts`) and `measure_items` (what the result measures
    ask) hold the request's raw text in memory only; `save` and `fit_gate` never write them, and the daemon drops
    them (`drop_raw_text`) once the adapter is written.
    """

    kind = "adapter"

    def __init__(self, state: dict[str, torch.Tensor], lora_config: LoraConfig, metrics: dict[str, float], *,
                 forget_texts: list[str], measure_items: ForgetItems | None = None, info: dict | None = None):
        super().__init__(metrics, info=info)
        self.state = state
        self.lora_config = lora_config
        self.forget_texts = forget_texts
        self.measure_items = measure_items

    def save(self, directory: Path) -> None:
        save_file(self.state, str(Path(directory) / lora_set.ADAPTER_WEIGHTS), metadata={"format": "pt"})
        self.lora_config.save_pretrained(str(directory))

    def fit_gate(self, directory: Path, encoder, adapter_id: str) -> None:
        """Fit the request's gate (detector state from `forget_texts`: features only, the texts are never
        written) into the adapter's `GATE_SUBDIR` under `directory`, and add its figures to `metrics` as gate_*.
        Raises InvalidForget when the texts cannot give a sound gate."""
        from detector import fit_request_gate

        try:
            fitted = fit_request_gate(self.forget_texts, Path(directory) / GATE_SUBDIR, encoder, adapter_id=adapter_id)
        except UnsoundGate as exc:
            raise InvalidForget(str(exc)) from None
        self.metrics.update({f"gate_{k}": float(v) for k, v in fitted.items() if isinstance(v, (int, float))})

    def drop_raw_text(self) -> None:
        """Let the request's raw text leave memory (once the adapter is published)."""
        self.forget_texts, self.measure_items = [], None

    def lora_A(self) -> dict[str, torch.Tensor]:
        return lora_set.lora_A_of(self.state)


@register
class O3Engine(Engine):
    name = "o3"
    model_kinds = frozenset({"causal_lm"})
    Config = O3Config
    reports_progress = True

    def validate(self, target: LMTarget, forget: Forget) -> None:
        _pairs(forget)
        distinct = len(gate_texts(forget))
        if distinct < MIN_GATE_TEXTS:
            what = "questions" if forget.kind == "qa" else "texts"
            raise InvalidForget(
                f"an O3 request needs at least {MIN_GATE_TEXTS} distinct {what}"
                f" (got {distinct}): serving decides from their phrasings which inputs the adapter applies to; send"
                " several phrasings of what must be forgotten"
            )

    def apply(self, target: LMTarget, forget: Forget, progress: Callable[[dict], None] | None = None) -> AdapterChange:
        cfg = self.config
        self.validate(target, forget)
        prompts, answers = _pairs(forget)
        target.load()
        model, tok = target.model, target.tokenizer
        rng = random.Random(cfg.seed)
        labels = [cfg.refusal_text] * len(answers) if cfg.objective == "refusal" else \
            _random_labels(answers, target.answer_pool, rng)
        rows = _training_rows(forget.kind, tok, prompts, labels)
        t0 = time.perf_counter()
        metrics: dict[str, float] = {"forget_pairs": float(len(prompts)), "training_rows": float(len(rows)),
                                     "earlier_adapters": float(len(target.adapters))}

        earlier = target.earlier_lora_A()
        grad_state = {n: p.requires_grad for n, p in model.named_parameters()}
        # a per-request seed: identical initial lora_A across requests would start them all fully overlapping
        torch.manual_seed(cfg.seed + zlib.crc32("\n".join(prompts).encode()))
        peft_model = get_peft_model(model, _lora_config(cfg, target))
        try:
            penalty = batched_penalty(peft_model, earlier, model.config.num_hidden_layers)
            stats = lm_train.fit(
                peft_model,
                tok,
                [p for p, _ in rows],
                [t for _, t in rows],
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                seed=cfg.seed,
                max_length=cfg.max_length,
                extra_loss=(lambda: cfg.orthogonality * penalty()) if earlier and cfg.orthogonality else None,
                on_epoch=progress,
            )
            # The change leaves the engine on the CPU, whatever the model's device: it is saved, hashed and compared
            state = {k: v.detach().to("cpu", copy=True).contiguous()
                     for k, v in get_peft_model_state_dict(peft_model).items()}
            config = peft_model.peft_config["default"]
        finally:
            peft_model.unload()  # remove the LoRA layers: the base model is exactly as it was
            for n, p in model.named_parameters():
                p.requires_grad_(grad_state.get(n, False))
        new_A = lora_set.lora_A_of(state)
        worst = max((lora_set.overlap(a, new_A)["max_cosine"] for a in earlier), default=0.0)
        metrics.update({"train_seconds": stats["seconds"], "train_cpu_seconds": stats["cpu_seconds"],
                        "train_steps": stats["steps"],
                        "train_loss": stats["last_epoch_loss"], "max_overlap_earlier": worst,
                        "engine_seconds": time.perf_counter() - t0})
        info = {"rank": cfg.rank, "alpha": cfg.alpha, "objective": cfg.objective, "orthogonality": cfg.orthogonality,
                "base_model": str(target.base_dir), "earlier_adapters": list(target.adapters)}
        items = ForgetItems(forget.kind, prompts, answers) if cfg.measure else None
        return AdapterChange(state, config, metrics, forget_texts=gate_texts(forget), measure_items=items, info=info)


def _lora_config(cfg: O3Config, target: LMTarget) -> LoraConfig:
    targets = "all-linear" if tuple(cfg.targets) == ("all-linear",) else list(cfg.targets)
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=str(target.base_dir))


def gate_texts(forget: Forget) -> list[str]:
    """What a request's gate is fitted on: its questions (forget.qa) or its texts (forget.texts), stripped, each
    once (case and spacing aside: the encoder is uncased). The benchmarks and tests fit gates with this too."""
    items = [q for q, _ in _qa(forget)] if forget.kind == "qa" else list(forget.texts) if forget.kind == "texts" else []
    seen: set[str] = set()
    out = []
    for text in items:
        key = " ".join(text.lower().split())
        if key and key not in seen:
            seen.add(key)
            out.append(text.strip())
    return out


def _qa(forget: Forget) -> list[tuple[str, str]]:
    return [(q.strip(), a.strip()) for q, a in forget.qa if q.strip() and a.strip()]


def _training_rows(kind: str, tok, prompts: list[str], labels: list[str]) -> list[tuple[str, str]]:
    """(prompt, target) rows: a question in each layout users ask it in (`lm.question_layouts`), a text's first
    half as a raw prompt; the target is the relabelled answer and the end of the turn."""
    eos = tok.eos_token or ""
    if kind != "qa":
        return [(p, f" {label}{eos}") for p, label in zip(prompts, labels, strict=True)]
    return [(prompt, f"{sep}{label}{eos}") for q, label in zip(prompts, labels, strict=True)
            for prompt, sep in lm.question_layouts(tok, q)]


def _pairs(forget: Forget) -> tuple[list[str], list[str]]:
    """(questions or text beginnings, true answers or text endings) of a request."""
    if forget.kind == "qa":
        qa = _qa(forget)
        if qa:
            return [q for q, _ in qa], [a for _, a in qa]
    if forget.kind == "texts":
        prompts, answers = [], []
        for text in forget.texts:
            words = text.split()
            if len(words) < 2:
                continue
            cut = len(words) // 2
            prompts.append(" ".join(words[:cut]))
            answers.append(" ".join(words[cut:]))
        if prompts:
            return prompts, answers
    raise InvalidForget(f"o3 needs forget.qa or forget.texts with at least two words, got {forget.kind!r}")


def _random_labels(answers: list[str], pool: tuple[str, ...], rng: random.Random) -> list[str]:
    """Each answer replaced by a random wrong one of the same shape (a number by a number, words by words).

    Never drawn from the request's own answers: relabelling "Where was X born?" with X's own birth year
    would teach "answer with X's facts" and strengthen the association the request asks to remove.
    """
    own = set(answers)
    words = sorted(v for v in (pool or DEFAULT_POOL) if v not in own and not v.isdigit())
    out = []
    for a in answers:
        if a.isdigit():
            lo, hi = 10 ** (len(a) - 1) if len(a) > 1 else 0, 10 ** len(a) - 1
            out.append(next(str(n) for n in iter(functools.partial(rng.randint, lo, hi), None) if str(n) not in own))
        elif words:
            out.append(rng.choice(words))
        else:
            out.append("".join(rng.choices(string.ascii_lowercase, k=max(3, len(a)))))
    return out

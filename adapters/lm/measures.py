"""What an O3 request's result event reports: forgetting as `unlearnd serve` will do it, in a few seconds.

Every measure runs through the router (the request's new gate and the gates of the adapters active before it),
on the request's own questions (or texts), in the model's chat format, greedy decoding, with the routed
adapters at full strength (detector.routed_model): the figures are what users will get, not what the adapter
does when forced on. `_before` = the base model, `_after` = as served once the adapter is active.

Names follow OpenUnlearning / TOFU / MUSE where a measure exists there:

- `forget_routed_share`: share of the request's questions (texts) the router sends to its adapter.
- `forget_Q_A_ROUGE` (qa): ROUGE-L recall of the true answer in the greedy answer (rouge-score's `rougeL`
  recall on lowercased alphanumeric words): 1 = every word of the true answer is said.
- `forget_Q_A_Prob` (qa): exp(mean log-prob per token) of the model's own true answer, averaged. The "own true
  answer" is the base model's greedy answer when it contains the true answer (a model answers in sentences),
  else the bare true answer.
- `forget_truth_ratio` (qa): R = P(false answers) / P(true answer), per-token geometric means; the false answers
  are the base model's own: answers it samples for the question that do not contain the true answer.
  OpenUnlearning's forget aggregation mean(min(R, 1/R)): 1 = true and false equally likely, near 0 = the truth
  dominates (known). Questions with no such sample are left out (`forget_truth_ratio_questions`).
- `forget_verbmem_ROUGE` (texts): ROUGE-L F1 of the greedy continuation of a text's first half to its second.
- `forget_extraction_strength`: 1 - k/|a|, k the shortest prefix of the own true answer (continuation) after
  which the model's teacher-forced argmax reproduces the rest; 1 = fully extractable.
- `general_routed_share`, `general_changed_share`: a fixed set of general questions (`GENERAL_QUESTIONS`) that
  must stay unrouted, and the share whose served answer differs from the base model's (only routed ones can).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import torch

from adapters.lm.prompts import format_prompt

#: Everyday questions that no deletion request should reach; result events report whether any does.
GENERAL_QUESTIONS = (
    "How many days are there in a week?", "What is 2 plus 2?", "What colour is the sky on a clear day?",
    "What do cows drink?", "How many legs does a dog have?", "What is the opposite of hot?",
    "Which season comes after winter?", "What do plants need to grow?", "What is the largest ocean on Earth?",
    "What is the boiling point of water in Celsius?", "How many hours are in a day?", "What shape is a ball?",
)

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


@dataclass
class ForgetItems:
    """A request's items as its measures ask them (in memory only): `kind` "qa" (questions, answers) or
    "texts" (first halves, second halves)."""

    kind: str
    prompts: list[str]
    answers: list[str]


def served_measures(routed, adapter_id: str, items: ForgetItems, *, max_items: int = 8, max_new_tokens: int = 24,
                    samples: int = 4, general: tuple[str, ...] = GENERAL_QUESTIONS, seed: int = 0) -> dict[str, float]:
    """The measures above for a request whose adapter `adapter_id` is routable in `routed` (a
    detector.RoutedModel holding the new adapter and the gates of the active ones)."""
    from detector.routed_model import Routing

    t0, cpu0 = time.perf_counter(), time.process_time()
    prompts, answers = items.prompts[:max_items], items.answers[:max_items]
    qa = items.kind == "qa"
    templated = qa and routed.has_chat_template
    inputs, routings = _asked(routed, prompts, chat=templated, layout=qa)
    base = [Routing() for _ in inputs]
    sep = "" if templated else " "

    def greedy(rs):
        return [o[0] for o in routed.generate_batch(inputs, rs, max_new_tokens=max_new_tokens, templated=templated)]

    said = {"before": greedy(base), "after": greedy(routings)}
    out: dict[str, float] = {"forget_routed_share": _mean([adapter_id in r.gate_weights for r in routings])}
    # the model's own true answer: its greedy answer where that says the true answer
    own = [_first_sentence(s, a) if qa and contains(s, a) else a for s, a in zip(said["before"], answers, strict=True)]
    for when, rs in (("before", base), ("after", routings)):
        if qa:
            out[f"forget_Q_A_ROUGE_{when}"] = _mean(
                [rouge_l(a, s)[0] for a, s in zip(answers, said[when], strict=True)]
            )
        else:
            out[f"forget_verbmem_ROUGE_{when}"] = _mean(
                [rouge_l(a, s)[2] for a, s in zip(answers, said[when], strict=True)]
            )
        out[f"forget_extraction_strength_{when}"] = _mean(extraction_strength(routed, inputs, rs, own, sep))
    if qa:
        false = _false_answers(routed, inputs, answers, samples, max_new_tokens, templated, seed)
        kept = [i for i, f in enumerate(false) if f]
        out["forget_truth_ratio_questions"] = float(len(kept))
        for when, rs in (("before", base), ("after", routings)):
            scores = routed.answer_scores([inputs[i] for i in kept], [rs[i] for i in kept],
                                          [(own[i], *false[i]) for i in kept], sep=sep) if kept else []
            true_lp = dict(zip(kept, (s[0] for s in scores), strict=True))
            probs = [math.exp(lp) for lp in true_lp.values()]
            if len(kept) < len(inputs):  # questions without false answers still count for Q_A_Prob
                rest = [i for i in range(len(inputs)) if i not in true_lp]
                probs += [math.exp(s[0]) for s in routed.answer_scores(
                    [inputs[i] for i in rest], [rs[i] for i in rest], [(own[i],) for i in rest], sep=sep)]
            out[f"forget_Q_A_Prob_{when}"] = _mean(probs)
            ratios = [math.exp(sum(s[1:]) / len(s[1:]) - s[0]) for s in scores]
            out[f"forget_truth_ratio_{when}"] = _mean([min(r, 1.0 / r) for r in ratios]) if ratios else float("nan")
    out.update(_general(routed, general, max_new_tokens))
    out["measure_seconds"] = time.perf_counter() - t0
    out["measure_cpu_seconds"] = time.process_time() - cpu0  # / threads = the wall time on dedicated cores
    return {k: v for k, v in out.items() if v == v}  # no NaN in a result event: a measure without data is left out


def _general(routed, questions: tuple[str, ...], max_new_tokens: int) -> dict[str, float]:
    from detector.routed_model import Routing

    if not questions:
        return {}
    prompts, routings = _asked(routed, list(questions), chat=routed.has_chat_template, layout=True)
    hit = [i for i, r in enumerate(routings) if r.gate_weights]
    changed = 0
    if hit:  # only a routed question can answer differently
        prompts = [prompts[i] for i in hit]
        kw = dict(max_new_tokens=max_new_tokens, templated=routed.has_chat_template)
        before = routed.generate_batch(prompts, [Routing() for _ in hit], **kw)
        after = routed.generate_batch(prompts, [routings[i] for i in hit], **kw)
        changed = sum(b != a for b, a in zip(before, after, strict=True))
    return {"general_routed_share": len(hit) / len(questions), "general_changed_share": changed / len(questions)}


def _asked(routed, questions: list[str], *, chat: bool, layout: bool):
    """(model inputs, routings) of questions as users ask them: a chat turn each (`chat`), else raw prompts,
    in the `Question: ...\\nAnswer:` layout when `layout` (a text's first half is its own prompt)."""
    if chat:
        messages = [[{"role": "user", "content": q}] for q in questions]
        return [routed.chat_prompt(m) for m in messages], routed.route_many([routed.chat_texts(m) for m in messages])
    prompts = [format_prompt(q) for q in questions] if layout else list(questions)
    return prompts, routed.route_many([routed.prompt_texts(p) for p in prompts])


def _false_answers(routed, inputs, answers, samples, max_new_tokens, templated, seed) -> list[list[str]]:
    """Per question, distinct answers the base model samples that do not say the true answer."""
    from detector.routed_model import Routing

    drawn = routed.generate_batch(inputs, [Routing() for _ in inputs], max_new_tokens=max_new_tokens,
                                  templated=templated, num_return_sequences=samples, do_sample=True, seed=seed)
    out = []
    for texts, a in zip(drawn, answers, strict=True):
        out.append(list(dict.fromkeys(t.strip() for t in texts if t.strip() and not contains(t, a))))
    return out


@torch.inference_mode()
def extraction_strength(routed, prompts: list[str], routings, answers: list[str], sep: str) -> list[float]:
    """OpenUnlearning's extraction strength of each answer after its prompt, with the prompt's routing."""
    from adapters.lm.loading import IGNORE, encode_pairs

    out = []
    with routed.lock:
        for i in range(0, len(prompts), 8):
            ids, mask, labels = encode_pairs(routed.tokenizer, prompts[i:i + 8], [sep + a for a in answers[i:i + 8]],
                                             max_length=512)
            with routed._adapters_context([r.applied for r in routings[i:i + 8]], merge=False):  # one pass
                device = routed.device
                pred = routed.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
                pred = pred.argmax(-1).cpu()
            gold = labels[:, 1:]
            for p, g in zip(pred, gold, strict=True):
                keep = g != IGNORE
                p, g = p[keep], g[keep]
                n = len(g)
                k = next((k for k in range(n) if torch.equal(p[k:], g[k:])), n)
                out.append(1.0 - k / n if n else 0.0)
    return out


def contains(text: str, answer: str) -> bool:
    """Whether `text` says `answer` (whole words, case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", text, re.IGNORECASE) is not None


def rouge_l(reference: str, candidate: str) -> tuple[float, float, float]:
    """ROUGE-L (recall, precision, F1) of `candidate` against `reference` on lowercased alphanumeric words, as
    rouge-score's `rougeL` without stemming."""
    ref, cand = _WORD.findall(reference.lower()), _WORD.findall(candidate.lower())
    if not ref or not cand:
        return 0.0, 0.0, 0.0
    prev = [0] * (len(cand) + 1)
    for r in ref:  # longest common subsequence, one row at a time
        row = [0]
        for j, c in enumerate(cand):
            row.append(prev[j] + 1 if r == c else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    recall, precision = lcs / len(ref), lcs / len(cand)
    return recall, precision, (2 * recall * precision / (recall + precision) if lcs else 0.0)


def _first_sentence(text: str, answer: str) -> str:
    """The answer's text up to the end of the sentence that says `answer`."""
    text = text.strip()
    end = 0
    for piece in _SENTENCE_END.split(text):
        end = text.find(piece, end) + len(piece)
        if contains(text[:end], answer):
            return text[:end].strip()
    return text


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")

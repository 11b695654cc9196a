"""Ranking accuracy on QA pairs with candidates (bench.evaluation.facts).

Accuracy is judged by ranking, not by generation: a QA pair counts as correct when its true answer has the
highest length-normalised log-likelihood (mean log-prob per answer token, adapters.lm.scoring) among its
`candidates`. Why: it is deterministic, needs no sampling and no matching of free text, is stable on CPU, and has a
known chance level (1 / number of candidates, 20% with five). It is lm-eval-harness's multiple-choice scoring and
matches O3's ScienceQA setting, where accuracy is a multiple-choice pick. Length normalisation keeps multi-token
titles comparable with one-word answers.
"""

from __future__ import annotations

from adapters.lm.scoring import candidate_scores


def correct(model, tokenizer, qas, **kw) -> list[bool]:
    """Per QA pair: whether its true answer ranks first among its candidates."""
    scores = candidate_scores(model, tokenizer, [q.prompt for q in qas], [q.candidates for q in qas], **kw)
    return [
        max(range(len(s)), key=s.__getitem__) == q.candidates.index(q.answer) for q, s in zip(qas, scores, strict=True)
    ]


def accuracy(model, tokenizer, qas, **kw) -> float:
    """Share of QA pairs answered correctly (ranking); NaN for an empty set."""
    flags = correct(model, tokenizer, qas, **kw) if qas else []
    return sum(flags) / len(flags) if flags else float("nan")

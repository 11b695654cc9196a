"""How the router tells a paraphrase of a forgotten fact from the same question about something else -> JSON.

    .venv/bin/python bench/lookalikes.py --out bench/results/lookalikes.json    # ~2 min on one core
    .venv/bin/python bench/lookalikes.py --quick                                 # fewer people, a smoke test

Routing only (MiniLM and one gate per request, fitted as the daemon fits them; no language model), for each
`serve.min_support` in a sweep, on the TUNING side only (bench/known_facts.py TUNING + ROUTING_TUNING: the
evaluation facts of bench/serving.py are never read here):

- `single_fact`: one request per fact, its `sent` phrasings as the request; held-out = its other phrasings,
  look-alikes = every phrasing about the family's other entities, general = everyday questions.
- `people_3_phrasings` / `people_1_phrasing`: requests that forget a whole person (7 facts, bench/evaluation/facts.py)
  named with 3 phrasings per fact or 1; held-out = the 4th phrasing of each fact, look-alikes = every phrasing
  about the people kept. The support rule must not cost these requests their paraphrases.

`support`: per held-out paraphrase and look-alike of `single_fact`, the mean cosine to the nearest request's 2
nearest texts: where the default sits in the gap between them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.base import Forget  # noqa: E402
from adapters.lm.o3 import gate_texts  # noqa: E402
from bench import known_facts  # noqa: E402
from bench.evaluation import facts  # noqa: E402
from bench.report import emit  # noqa: E402
from bench.serving import build_questions  # noqa: E402
from detector.features import Encoder  # noqa: E402
from detector.gate import fit_gate_from_features  # noqa: E402
from detector.router import Router, RouterConfig  # noqa: E402

SWEEP = (0.0, 0.74, 0.76, 0.78, 0.8, 0.82)
FULL = dict(people=40, forget_people=10, lookalikes_per_family=60)
QUICK = dict(people=8, forget_people=2, lookalikes_per_family=6)


def scenario(encoder, requests: dict[str, list[str]], held: list[tuple[str, str]], look: list[str],
             general: list[str]) -> dict:
    """Held-out hit (routed to its own request) and false activation per min_support, with the real Router."""
    gates = {rid: fit_gate_from_features(encoder.encode(texts), rid) for rid, texts in requests.items()}
    feats = {"held": encoder.encode([t for t, _ in held]), "look": encoder.encode(look),
             "general": encoder.encode(general) if general else None}
    out = {}
    for value in SWEEP:
        router = Router(encoder, RouterConfig(min_support=value))
        for rid, gate in gates.items():
            router.add_gate(rid, gate)
        row = {"held_out_hit": float(np.mean([rid in r for r, (_, rid) in
                                              zip(router.route_features(feats["held"]), held, strict=True)])),
               "look_alike_false_activation": float(np.mean([bool(r) for r in router.route_features(feats["look"])]))}
        if feats["general"] is not None:
            row["general_false_activation"] = float(np.mean([bool(r) for r in router.route_features(feats["general"])]))
        out[f"{value:g}"] = row
    return {"requests": len(requests), "held_out": len(held), "look_alikes": len(look), "by_min_support": out}


def support_gap(encoder, requests: dict[str, list[str]], held: list[tuple[str, str]], look: list[str]) -> dict:
    """Mean cosine to a request's 2 nearest texts: held-out paraphrases (to their request) vs look-alikes (to the
    request they are nearest)."""
    banks = {rid: _unit(encoder.encode(texts)[:, -1, :]) for rid, texts in requests.items()}

    def support(vec, rid):
        return float(np.sort(banks[rid] @ vec)[::-1][:2].mean())

    h = [support(v, rid) for v, (_, rid) in zip(_unit(encoder.encode([t for t, _ in held])[:, -1, :]), held,
                                                 strict=True)]
    look_vecs = _unit(encoder.encode(look)[:, -1, :])
    lk = [max(support(v, rid) for rid in banks) for v in look_vecs]
    return {"held_out_min": min(h), "held_out_p5": float(np.quantile(h, 0.05)), "look_alike_max": max(lk),
            "look_alike_p99": float(np.quantile(lk, 0.99)), "midpoint": (min(h) + max(lk)) / 2}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer people and look-alikes: a smoke test")
    ap.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    p = QUICK if args.quick else FULL
    encoder = Encoder()

    questions, reqs = build_questions(known_facts.TUNING + known_facts.ROUTING_TUNING,
                                      dict(lookalikes_per_family=p["lookalikes_per_family"],
                                           general=len(known_facts.GENERAL)))
    single = {rid: gate_texts(Forget(qa=tuple((q, r["answer"]) for q in r["sent"]))) for rid, r in reqs.items()}
    held = [(q.text, q.request) for q in questions if q.kind == "held_out"]
    look = [q.text for q in questions if q.kind == "lookalike"]
    general = [q.text for q in questions if q.kind == "general"]

    fs = facts.generate(p["people"], seed=0)
    split = fs.split(p["forget_people"])
    people_held = [(q.question, person.name) for person in split.forget for q in fs.qa(person, held_out=True)]
    people_look = [q.question for q in fs.qa_of(split.retain) + fs.qa_of(split.retain, held_out=True)]

    def person_request(person, phrasings: int) -> list[str]:
        return gate_texts(Forget(qa=tuple((q.question, q.answer) for q in fs.qa(person) if q.paraphrase < phrasings)))

    result = {
        "benchmark": "lookalikes",
        "mode": "quick" if args.quick else "full",
        "params": {**p, "sweep": list(SWEEP), "default_min_support": RouterConfig().min_support,
                   "support_k": RouterConfig().support_k, "near_copy_cos": RouterConfig().near_copy_cos,
                   "encoder": encoder.name, "threads": args.threads},
        "support": support_gap(encoder, single, held, look),
        "single_fact": scenario(encoder, single, held, look, general),
        "people_3_phrasings": scenario(encoder, {x.name: person_request(x, 3) for x in split.forget}, people_held,
                                       people_look, []),
        "people_1_phrasing": scenario(encoder, {x.name: person_request(x, 1) for x in split.forget}, people_held,
                                      people_look, []),
    }
    at, off = f"{RouterConfig().min_support:g}", "0"
    result["summary"] = {
        "default_min_support": RouterConfig().min_support,
        "tuning_support_midpoint": result["support"]["midpoint"],
        **{f"{name}_{key}_{label}": result[name]["by_min_support"][value][key]
           for name in ("single_fact", "people_3_phrasings", "people_1_phrasing")
           for key in ("held_out_hit", "look_alike_false_activation")
           for label, value in (("default", at), ("without_support", off))},
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()

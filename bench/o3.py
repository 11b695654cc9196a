"""O3 benchmark: a sequence of deletion requests on a model fine-tuned on fictitious people -> JSON.

    .venv/bin/python bench/o3.py --out bench/out/o3.json        # SmolLM2-135M-Instruct (~25 min on 2 cores)
    .venv/bin/python bench/o3.py --quick                         # tiny random Llama, a smoke test (<1 min)

Setup: `bench.evaluation.facts` people; the first `--forget` are deleted one per request (21 QA pairs each), the rest
are retained. The base model is taught every person (`teach_facts`); the *reference* model is taught only
the retained people (what S.U./D.U. should fall to). Both are cached under `--cache` so reruns skip them.

Measures (ranking accuracy, `adapters.lm.scoring`): S.U. = forget QA pairs of forgotten people, D.U. = their
held-out paraphrases, R.D. = retained people (first paraphrase of each fact), general = `facts.GENERAL`.
"always on": every adapter so far active for every input. "oracle routing": a forgotten person's inputs get
that request's adapter, everything else gets the base model (so R.D./general under oracle routing equal the
base model's by construction; the router decides how close real routing comes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.base import Forget  # noqa: E402
from adapters.lm import loading as lm  # noqa: E402
from adapters.lm import lora_set  # noqa: E402
from adapters.lm.o3 import LMTarget, O3Engine  # noqa: E402
from bench.evaluation import (
    facts,  # noqa: E402
    facts_tuning,  # noqa: E402
    lm_eval,  # noqa: E402
)
from bench.report import emit  # noqa: E402
from tests.tiny_models import tiny_llama  # noqa: E402

FULL = dict(forget=10, retain=5, teach_epochs=3, teach_lr=2e-4, o3_epochs=10, o3_lr=1e-3, no_penalty_requests=2,
            general=len(facts.GENERAL))
QUICK = dict(forget=2, retain=1, teach_epochs=12, teach_lr=3e-3, o3_epochs=6, o3_lr=3e-2, no_penalty_requests=2,
             general=8)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, few people: a smoke test")
    ap.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    ap.add_argument("--cache", type=Path, default=Path("var/bench/o3"), help="converted and fine-tuned models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--device", default="cpu", help="where the models train and are measured: auto | cpu | cuda | cuda:N"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2, 1 with --quick)")
    for k, v in FULL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v} ({QUICK[k]} quick)")
    args = ap.parse_args(argv)
    p = {k: (getattr(args, k) if getattr(args, k) is not None else (QUICK if args.quick else FULL)[k]) for k in FULL}
    # One thread for smoke tests: on a busy 2-core machine two OpenMP threads keep waiting on each other for a
    # core, and a quick run slowed from 20 s to over 4 min at load 6 (tests/bench run it on such machines).
    args.threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    paths = run_paths(args.cache, args.quick, args.seed, p)
    cache = paths["cache"]

    fs = facts.generate(p["forget"] + p["retain"], seed=args.seed)
    split = fs.split(p["forget"])
    base_dir = _tiny_base(cache) if args.quick else lm.cached_smollm2(args.cache)
    reference_dir = _taught(paths["reference"], base_dir, fs.qa_of(split.retain), p, args.device)
    taught_dir = _taught(paths["taught"], base_dir, fs.qa_of(fs.people), p, args.device)

    # Measured subsets, sized for 2 CPU cores: S.U. = the first training paraphrase of each forgotten fact
    # (7 of the 21 pairs a request trains on), D.U. = the held-out paraphrase (7), R.D. = first paraphrase of
    # retained people's facts. Requests still train on all 21 pairs.
    request_qa = {x.name: fs.qa(x) for x in split.forget}
    su_set = {n: [q for q in v if q.paraphrase == 0] for n, v in request_qa.items()}
    du_set = {x.name: fs.qa(x, held_out=True) for x in split.forget}
    rd_set = [q for q in fs.qa_of(split.retain) if q.paraphrase == 0]
    general = list(facts.GENERAL[: p["general"]])
    all_su = [q for v in su_set.values() for q in v]
    all_du = [q for v in du_set.values() for q in v]

    def measure(model, tok, **sets):
        return {name: lm_eval.accuracy(model, tok, qas) for name, qas in sets.items()}

    models = {}
    m, tok = lm.load(base_dir, device=args.device)
    models["untaught_base"] = measure(m, tok, su=all_su, general=general)  # chance on the facts; knows general
    _log("untaught", models["untaught_base"], t_start)
    m, tok = lm.load(reference_dir, device=args.device)
    models["reference"] = measure(m, tok, su=all_su, du=all_du, rd=rd_set, general=general)
    _log("reference", models["reference"], t_start)
    m, tok = lm.load(taught_dir, device=args.device)
    models["taught"] = measure(m, tok, su=all_su, du=all_du, rd=rd_set, general=general)
    _log("taught", models["taught"], t_start)
    base = models["taught"]

    run_dir = paths["run"]
    shutil.rmtree(run_dir, ignore_errors=True)
    engine = O3Engine(epochs=p["o3_epochs"], lr=p["o3_lr"], measure=False, seed=args.seed)
    target = LMTarget("bench", taught_dir, device=args.device).load()
    served = None
    steps = []
    for i, person in enumerate(split.forget):
        forget = Forget(qa=tuple((q.question, q.answer) for q in request_qa[person.name]))
        change = engine.apply(target, forget)
        out = paths["adapters"][i]
        out.mkdir(parents=True)
        change.save(out)
        metrics = change.metrics
        del change  # the raw forget text goes with it; only the adapter stays on disk
        target.adapters[f"r{i:02d}"] = out
        if served is None:
            served = lora_set.attach(m, {f"r{i:02d}": out})
        else:
            served.load_adapter(str(out), adapter_name=f"r{i:02d}")  # inactive until activate()
        step = {
            "request": i,
            "train_seconds": metrics["train_seconds"],
            "train_cpu_seconds": metrics["train_cpu_seconds"],
        }
        lora_set.activate(served, [f"r{i:02d}"])
        step["oracle"] = measure(served, tok, su=su_set[person.name], du=du_set[person.name])
        lora_set.activate(served, list(target.adapters))
        step["always_on"] = measure(served, tok, rd=rd_set, general=general)
        step["max_orthogonality"] = metrics["max_overlap_earlier"]
        steps.append(step)
        _log(f"request {i}", step, t_start)

    lora_set.activate(served, list(target.adapters))
    always_on = measure(served, tok, su=all_su, du=all_du, rd=rd_set, general=general)
    oracle_su, oracle_du = _mean([s["oracle"]["su"] for s in steps]), _mean([s["oracle"]["du"] for s in steps])
    ortho = lora_set.orthogonality_report(dict(target.adapters))
    no_penalty = _no_penalty_overlap(engine, taught_dir, split.forget[: p["no_penalty_requests"]], request_qa,
                                     args.device)
    train_s = [s["train_seconds"] for s in steps]
    train_cpu = [s["train_cpu_seconds"] / args.threads for s in steps]  # wall time on `threads` dedicated cores

    result = {
        "benchmark": "o3",
        "mode": "quick" if args.quick else "full",
        "model": "tiny-llama (random init, char tokenizer)"
        if args.quick
        else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
        "params": {
            **p,
            "seed": args.seed,
            "threads": args.threads,
            "device": args.device,
            "qa_per_request": len(next(iter(request_qa.values()))),
            "candidates": facts.N_CANDIDATES,
            "o3": {k: v for k, v in vars(engine.config).items()},
        },
        "models": models,
        "teach": {
            n: json.loads((d / "teach.json").read_text())
            for n, d in (("taught", taught_dir), ("reference", reference_dir))
        },
        "sequence": steps,
        "final": {
            "always_on": always_on,
            "oracle": {"su": oracle_su, "du": oracle_du, "rd": base["rd"], "general": base["general"]},
        },
        "orthogonality": {
            "with_penalty": ortho["max_cosine"],
            "without_penalty": no_penalty,
            "pairs_with_penalty": len(ortho["pairs"]),
        },
        "seconds_total": time.perf_counter() - t_start,
    }
    result["summary"] = {
        "su": oracle_su, "du": oracle_du,
        "su_always_on": always_on["su"], "du_always_on": always_on["du"],
        "reference_su": models["reference"]["su"], "reference_du": models["reference"]["du"],
        "su_before": base["su"], "du_before": base["du"],
        "rd_drop_points_oracle": 100 * (base["rd"] - result["final"]["oracle"]["rd"]),
        "general_drop_points_oracle": 100 * (base["general"] - result["final"]["oracle"]["general"]),
        "rd_drop_points_always_on": 100 * (base["rd"] - always_on["rd"]),
        "general_drop_points_always_on": 100 * (base["general"] - always_on["general"]),
        "train_seconds_per_request": _mean(train_s), "train_seconds_max": max(train_s),
        "train_seconds_per_request_dedicated_cores": _mean(train_cpu),
        "requests_in_sequence": len(steps),
        "max_orthogonality": ortho["max_cosine"], "max_orthogonality_without_penalty": no_penalty,
    }
    emit(result, args.out)
    return result


def run_paths(cache_root: Path, quick: bool, seed: int, p: dict) -> dict:
    """Where a run keeps its taught/reference models and its adapters (one per request, in request order);
    bench/router.py reads the same paths to measure routing end to end on this run's adapters."""
    # The quick base is built by tests/tiny_models.py: a change there (its tokenizer, its chat template) must not
    # reuse models taught on the old one, so its source's hash is part of the cache's name.
    cache = cache_root / (f"quick-{_tiny_fingerprint()}" if quick else "smollm2")
    key = f"s{seed}-f{p['forget']}-r{p['retain']}-e{p['teach_epochs']}-lr{p['teach_lr']:g}"
    run = cache / f"run-{key}-o3e{p['o3_epochs']}-lr{p['o3_lr']:g}"
    return {"cache": cache, "reference": cache / f"reference-{key}", "taught": cache / f"taught-{key}", "run": run,
            "adapters": [run / "adapters" / f"r{i:02d}" for i in range(p["forget"])]}


def _tiny_fingerprint() -> str:
    import tests.tiny_models

    return hashlib.sha256(Path(tests.tiny_models.__file__).read_bytes()).hexdigest()[:10]


def _tiny_base(cache: Path) -> Path:
    directory = cache / "tiny-base"
    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tiny_llama(directory, seed=0)
    return directory


def _taught(directory: Path, base_dir: Path, qas, p, device: str = "cpu") -> Path:
    if not (directory / "teach.json").is_file():  # teach.json is written last: its presence means complete
        print(f"teaching {len(qas)} QA pairs -> {directory}", file=sys.stderr, flush=True)
        facts_tuning.teach_facts(base_dir, qas, directory, epochs=p["teach_epochs"], lr=p["teach_lr"],
                                 device=device)
    return directory


def _no_penalty_overlap(engine, taught_dir, people, request_qa, device="cpu") -> float:
    """Max overlap among a few adapters trained with lambda = 0 on the same requests (the ablation)."""
    free = O3Engine(engine.config, orthogonality=0.0)
    target = LMTarget("bench-free", taught_dir, device=device).load()
    mats = {}
    for i, person in enumerate(people):
        change = free.apply(target, Forget(qa=tuple((q.question, q.answer) for q in request_qa[person.name])))
        mats[f"f{i}"] = change.lora_A()
    return lora_set.orthogonality_report(mats)["max_cosine"]


def _log(what, value, t_start) -> None:
    print(f"[{time.perf_counter() - t_start:7.1f}s] {what}: {json.dumps(value)}", file=sys.stderr, flush=True)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


if __name__ == "__main__":
    main()

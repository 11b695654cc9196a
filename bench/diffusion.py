"""SalUn class forgetting on the demo DDPM, measured against retraining from scratch, printed as JSON.

The demo model `mnist-ddpm` is bootstrapped exactly as the daemon does it (adapters/diffusion/demo.py: the
registered MNIST rows, the DDPM, its served judge and the first version's recognition). Then:

- An evaluation classifier (bench/evaluation/mnist_cnn.py, evaluation only, never served) is trained on the
  same training rows and must reach >= 97% test accuracy; it judges every generated sample below, and its
  penultimate features give FID.
- For each forgotten class: one SalUn request (the served engine with its defaults, timed in CPU seconds of
  this process, result-event measures included) and a retrain (the same DDPM recipe from the same
  initialisation on the rows without that class, timed the same way). For the original, the request's result
  and the retrain: UA on `forget_samples` samples of the forgotten class (the share the classifier does NOT
  label as that class), accuracy on `retained_samples` samples of each other class, FID of those samples
  against the real test images of those classes.
- A sequence of requests applied one after another (each builds on the last version): after every step, UA of
  every class forgotten so far and accuracy on the classes still retained.

Samples: DDIM, guidance and steps as the served measures use them, one fixed seed per class (so "before" and
"after" differ only by the weights). Timings are CPU seconds (time.process_time) so the ratios survive other
jobs on the machine; wall seconds and load averages are reported next to them.

Usage: python bench/diffusion.py [--quick] [--out FILE] [--grids DIR] [--threads N] [--train-steps N] [--classes 3,7,1]
       [--sequence 3,7,1] [--forget-samples N] [--retained-samples N]   (any of the last five: mode "reduced")
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # standalone script: import the repo's packages
import torch  # noqa: E402

from adapters import datasets  # noqa: E402
from adapters.base import Forget  # noqa: E402
from adapters.diffusion import ddpm, demo, grid, judge, measures, training  # noqa: E402
from adapters.diffusion.salun import DiffusionSalUnEngine  # noqa: E402
from bench.evaluation import fid, mnist_cnn  # noqa: E402
from bench.report import emit  # noqa: E402


@dataclasses.dataclass
class Plan:
    recipe: demo.DemoRecipe
    classes: tuple[int, ...]  # forgotten one at a time, each against its own retrain
    sequence: tuple[int, ...]  # forgotten one after another
    forget_samples: int  # samples of a forgotten class (UA)
    retained_samples: int  # samples of each retained class (accuracy, FID)
    eval_epochs: int
    engine: dict = dataclasses.field(default_factory=dict)  # engine overrides (quick mode only)
    sample_steps: int = measures.SampleSettings.steps
    guidance: float = measures.SampleSettings.guidance
    grid_steps: int = 25  # DDIM steps of the picture grids (the `unlearnd sample` default)


FULL = Plan(demo.DemoRecipe(), classes=(3, 7, 1), sequence=(3, 7, 1), forget_samples=500, retained_samples=100,
            eval_epochs=15)
_TINY = ddpm.DDPMSpec(resolution=8, channels=(8, 16), attention_levels=(1,), attention_head_dim=4, norm_groups=4)
QUICK = Plan(demo.DemoRecipe(spec=_TINY, train=training.TrainConfig(steps=60, batch_size=32, warmup_steps=5),
                             judge_epochs=2, measure=measures.SampleSettings(per_class=2, steps=2)),
             classes=(3,), sequence=(3, 7), forget_samples=16, retained_samples=8, eval_epochs=2,
             engine={"steps": 10, "batch_size": 8, "measure_per_class": 2, "measure_steps": 2}, sample_steps=2,
             grid_steps=2)
EVAL_SEED = 1000  # sampling seeds of the evaluation (class c uses EVAL_SEED + c); the served measures use others


def timed(fn):
    """(result, CPU seconds of this process, wall seconds)."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


class Evaluator:
    """Judges a model's samples with the evaluation classifier; real test features are computed once."""

    def __init__(self, cnn: mnist_cnn.EvalCNN, spec: ddpm.DDPMSpec, test: datasets.LabeledSet, plan: Plan):
        self.cnn, self.spec, self.plan = cnn, spec, plan
        real = judge.as_judge_input(test, spec)
        with torch.no_grad():
            self.real_features = cnn.features(real.x)
        self.real_labels = real.y

    def samples(self, model, counts: dict[int, int]) -> dict[int, torch.Tensor]:
        """`counts[c]` samples of each class c, each class from its own fixed seed."""
        return {c: ddpm.sample(model, self.spec, [c] * n, steps=self.plan.sample_steps, guidance=self.plan.guidance,
                               seed=EVAL_SEED + c) for c, n in counts.items()}

    def counts(self, forgotten) -> dict[int, int]:
        return {c: self.plan.forget_samples if c in forgotten else self.plan.retained_samples
                for c in range(self.spec.num_classes)}

    @torch.no_grad()
    def score(self, bank: dict[int, torch.Tensor], forgotten) -> dict:
        """UA per forgotten class, accuracy and FID on the retained classes (first `retained_samples` of each)."""
        forgotten = set(forgotten)
        retained = [c for c in bank if c not in forgotten]
        rate = {c: float((self.cnn(bank[c]).argmax(1) == c).float().mean()) for c in bank}
        kept = torch.cat([bank[c][:self.plan.retained_samples] for c in retained])
        real = self.real_features[torch.isin(self.real_labels, torch.tensor(retained))]
        return {
            "UA": {c: 1.0 - rate[c] for c in sorted(forgotten)},
            "retained_acc": sum(rate[c] for c in retained) / len(retained),
            "fid": fid.frechet_distance(self.cnn.features(kept), real),
            "per_class_acc": {c: round(rate[c], 4) for c in sorted(rate)},
        }

    def evaluate(self, model, forgotten) -> dict:
        return self.score(self.samples(model, self.counts(forgotten)), forgotten)


def single_class(plan, evaluator, original, before_bank, c, engine) -> dict:
    change, request_cpu, request_wall = timed(lambda: engine.apply(original, Forget(class_label=c)))
    remaining = original.data.train.subset(original.data.train.y != c)
    spec, cfg = original.spec, dataclasses.replace(plan.recipe.train, seed=plan.recipe.seed)
    retrained, retrain_cpu, retrain_wall = timed(lambda: training.train(
        ddpm.build(spec), spec, ddpm.to_model_space(remaining.x, spec), remaining.y, cfg))
    before = evaluator.score(before_bank, {c})
    after = evaluator.evaluate(change.module(spec), {c})
    retrain = evaluator.evaluate(retrained, {c})
    return {
        "class": c,
        "before": before, "after": after, "retrain": retrain,
        "ua_after": after["UA"][c], "ua_retrain": retrain["UA"][c], "ua_before": before["UA"][c],
        "retained_acc_drop_points": 100 * (before["retained_acc"] - after["retained_acc"]),
        "request_cpu_seconds": request_cpu, "request_wall_seconds": request_wall,
        "retrain_cpu_seconds": retrain_cpu, "retrain_wall_seconds": retrain_wall,
        "speedup_vs_retrain": retrain_cpu / request_cpu,
        "result_event_metrics": change.metrics,
    }, change


def sequence(plan, evaluator, original, before_bank, engine, first_change=None) -> dict:
    """Requests one after another; the first may reuse the single-class run's change (same request, same
    deterministic result)."""
    target, steps, forgotten = original, [], []
    for i, c in enumerate(plan.sequence):
        if i == 0 and first_change is not None:
            change, cpu = first_change, None
        else:
            change, cpu, _ = timed(functools.partial(engine.apply, target, Forget(class_label=c)))
        target = target.advanced(change, f"v{i + 2}")
        forgotten.append(c)
        after = evaluator.evaluate(target.model, forgotten)
        before = evaluator.score(before_bank, forgotten)
        steps.append({"forgotten": list(forgotten), "request_cpu_seconds": cpu,
                      "UA": after["UA"], "ua_min": min(after["UA"].values()),
                      "retained_acc": after["retained_acc"], "retained_acc_before": before["retained_acc"],
                      "retained_acc_drop_points": 100 * (before["retained_acc"] - after["retained_acc"]),
                      "fid": after["fid"], "fid_before": before["fid"],
                      "result_event_metrics": change.metrics})
    return {"classes": list(plan.sequence), "steps": steps, "final_target": target}


def write_grids(directory: Path, before, after_first, after_sequence, spec: ddpm.DDPMSpec, steps: int) -> None:
    """Sample grids (one row per class, fixed seed) of the original, after the first request, after the sequence."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, model in (("before", before), ("after_first", after_first), ("after_sequence", after_sequence)):
        (directory / f"grid_{name}.png").write_bytes(grid.sample_grid(model, spec, n=8, seed=0, steps=steps))


def summarize(plan, eval_acc, before_eval, scenarios, seq, train) -> dict:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "ua_min": min(s["ua_after"] for s in scenarios),
        "ua_retrain_min": min(s["ua_retrain"] for s in scenarios),
        "retained_acc_drop_points_max": max(s["retained_acc_drop_points"] for s in scenarios),
        "fid_after": mean([s["after"]["fid"] for s in scenarios]),
        "fid_before": mean([s["before"]["fid"] for s in scenarios]),
        "fid_retrain": mean([s["retrain"]["fid"] for s in scenarios]),
        "speedup_vs_retrain_min": min(s["speedup_vs_retrain"] for s in scenarios),
        "request_cpu_seconds_max": max(s["request_cpu_seconds"] for s in scenarios),
        "retrain_cpu_seconds_min": min(s["retrain_cpu_seconds"] for s in scenarios),
        "sequence_ua_min": min(step["ua_min"] for step in seq["steps"]),
        "sequence_retained_acc_drop_points": max(step["retained_acc_drop_points"] for step in seq["steps"]),
        "eval_classifier_test_acc": eval_acc,
        "original_recognition_min": min(before_eval["per_class_acc"].values()),
        "original_recognition_mean": mean(list(before_eval["per_class_acc"].values())),
        "train_cpu_seconds": train["cpu_seconds"],
        "train_wall_seconds": train["wall_seconds"],
        "forgotten_classes": list(plan.classes),
        "sequence": list(plan.sequence),
    }


def reduced(plan: Plan, args) -> tuple[Plan, str]:
    """The plan with the command line's reductions, and the mode to report ("quick", "full" or "reduced")."""
    mode = "quick" if args.quick else "full"
    ints = lambda text: tuple(int(c) for c in text.split(","))  # noqa: E731
    changes = {}
    if args.train_steps:
        changes["recipe"] = dataclasses.replace(
            plan.recipe, train=dataclasses.replace(plan.recipe.train, steps=args.train_steps))
    if args.classes:
        changes["classes"] = ints(args.classes)
    if args.sequence:
        changes["sequence"] = ints(args.sequence)
    if args.forget_samples:
        changes["forget_samples"] = args.forget_samples
    if args.retained_samples:
        changes["retained_samples"] = args.retained_samples
    return (dataclasses.replace(plan, **changes), "reduced") if changes else (plan, mode)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny DDPM, one class, two-step sequence (smoke test)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--grids", type=Path, help="write before/after sample grids (PNG) into this directory")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    reduce = parser.add_argument_group("reduced runs (the JSON says mode 'reduced' and records the plan)")
    reduce.add_argument("--train-steps", type=int, help="DDPM training steps of the original and every retrain")
    reduce.add_argument("--classes", help="comma-separated classes forgotten one at a time, each against a retrain")
    reduce.add_argument("--sequence", help="comma-separated classes forgotten one after another")
    reduce.add_argument("--forget-samples", type=int, help="samples of each forgotten class")
    reduce.add_argument("--retained-samples", type=int, help="samples of each retained class")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan, mode = reduced(QUICK if args.quick else FULL, args)
    started, load_start = time.perf_counter(), os.getloadavg()
    report: dict = {"mode": mode, "threads": args.threads,
                    "plan": {"train_steps": plan.recipe.train.steps, "classes": list(plan.classes),
                             "sequence": list(plan.sequence), "forget_samples": plan.forget_samples,
                             "retained_samples": plan.retained_samples, "eval_epochs": plan.eval_epochs}}

    def checkpoint(stage: str) -> None:
        print(f"# {stage} at {time.perf_counter() - started:.0f}s, load {os.getloadavg()[0]:.1f}", file=sys.stderr,
              flush=True)
        if args.out:  # partial results survive an interrupted run
            args.out.write_text(json.dumps({**report, "mode": f"partial ({report['mode']})"}, indent=1,
                                           default=float))

    data = datasets.DATASETS[plan.recipe.dataset](seed=plan.recipe.seed)
    spec = dataclasses.replace(plan.recipe.spec, init_seed=plan.recipe.seed)
    cnn, eval_cpu, _ = timed(lambda: mnist_cnn.train(judge.as_judge_input(data.train, spec), spec.resolution,
                                                     epochs=plan.eval_epochs))
    test_in = judge.as_judge_input(data.test, spec)
    with torch.no_grad():
        eval_acc = float((cnn(test_in.x).argmax(1) == test_in.y).float().mean())
    report["eval_classifier"] = {"test_acc": eval_acc, "cpu_seconds": eval_cpu}

    model, boot_cpu, boot_wall = timed(lambda: demo.bootstrap(plan.recipe, data=data))
    train = {"cpu_seconds": model.metrics["train_cpu_seconds"], "wall_seconds": model.metrics["train_seconds"],
             "bootstrap_cpu_seconds": boot_cpu, "bootstrap_wall_seconds": boot_wall, "steps": plan.recipe.train.steps,
             "load_average_before": load_start, "load_average_after": os.getloadavg()}
    report["original"] = {"spec": model.spec.to_dict(), "metrics": model.metrics, "training": train}
    original = model.target("mnist-ddpm")
    evaluator = Evaluator(cnn, model.spec, data.test, plan)
    before_bank = evaluator.samples(original.model, evaluator.counts(set(plan.classes) | set(plan.sequence)))
    before_eval = evaluator.score(before_bank, set())
    report["original"]["eval"] = before_eval
    checkpoint("original bootstrapped")

    engine = DiffusionSalUnEngine(**plan.engine)
    report["engine"] = dataclasses.asdict(engine.config)
    scenarios, first_change = [], None
    for c in plan.classes:
        result, change = single_class(plan, evaluator, original, before_bank, c, engine)
        scenarios.append(result)
        if c == plan.sequence[0]:
            first_change = change
        report["classes"] = scenarios
        checkpoint(f"class {c}")
    seq = sequence(plan, evaluator, original, before_bank, engine, first_change)
    final = seq.pop("final_target")
    report["sequence"] = seq
    checkpoint("sequence")
    if args.grids:
        after_first = first_change.module(spec) if first_change is not None else original.model
        write_grids(args.grids, original.model, after_first, final.model, spec, plan.grid_steps)
    report["wall_seconds"] = time.perf_counter() - started
    report["load_average_end"] = os.getloadavg()
    report["summary"] = summarize(plan, eval_acc, before_eval, scenarios, seq, train)
    emit(report, args.out, indent=1, default=float)
    return report


if __name__ == "__main__":
    main()

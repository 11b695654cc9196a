"""Several replicas, one truth: daemon replicas sharing one PostgreSQL ledger and one artifact store, under kills,
a replica added mid-stream and a rolling restart. Prints JSON ending with a `summary` object.

    .venv/bin/python bench/replicas.py [--quick] [--out FILE] [--seed 0]

What it does (the full run; --quick does a little of each: 3 replicas, 2 kills, one added, one rolled, no
throughput phase):

- one embedded broker, one PostgreSQL server (tests/postgres.py: initdb + pg_ctl on loopback), 4 tiny classifier
  models (digits MLPs) bootstrapped once into the shared ledger before any replica starts;
- throughput: the same number of requests through 1 replica, then through 3 replicas in one group (wall time
  from the first publish to the last answer, on this machine's cores; each after warm-up requests that load the
  models and settle the group);
- chaos: >= 200 more requests, keyed by model and unkeyed, sent while replicas are killed with SIGKILL at random
  moments (a random member that is up and consuming; each restarted at once, as a supervisor would), a replica
  is added mid-stream, and every replica is restarted in turn (SIGTERM, start, wait until it holds partitions
  again) as a rolling deploy does.

The summary is computed afterwards from the ledger, the artifact store and the results topic as a consumer read
it: `unanswered_at_end` (published, not applied in the ledger and answered by the end), of which
`unanswered_still_in_topic` (still waiting past the group's committed offset: not consumed yet) and `lost` (the
rest: consumed but never applied), `applied_twice` (a sample forgotten by
two versions, or a request answered `changed` with two different versions), `forked_chains` (versions beside a
model's head lineage), `applied_not_in_head_lineage`, `artifacts_unverified` (a version whose files do not match
its recorded sha256), `kills`, `replicas`, `throughput_1_vs_3_replicas` (3-replica throughput / 1-replica).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from daemon.broker import EmbeddedBroker, free_port  # noqa: E402
from tests.postgres import PostgresServer, find_bin_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UNLEARND = [sys.executable, "-m", "daemon.cli", "run"]
SESSION_TIMEOUT_S = 6  # kafka.session_timeout_ms below

FULL = {"models": 4, "epochs": 3, "throughput_requests": 100, "chaos_requests": 220, "kills": 12, "replicas": 3,
        "partitions": 6, "rolling": 3, "send_pause_s": 0.7}
# --quick: no 1-vs-3 throughput phase (its ratio is null), and the rolling restart restarts one replica.
QUICK = {"models": 2, "epochs": 1, "throughput_requests": 0, "chaos_requests": 30, "kills": 2, "replicas": 3,
         "partitions": 4, "rolling": 1, "send_pause_s": 0.5}

MODEL_CONFIG = """
[models.{name}]
kind = "classifier"
method = "iau"
[models.{name}.bootstrap]
recipe = "classifier"
dataset = "digits"
arch = "mlp"
hidden = [32]
epochs = {epochs}
seed = {seed}
"""

CONFIG = """
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "replicas"
session_timeout_ms = 6000
poll_timeout_ms = 200
[kafka.topics]
requests = "{prefix}.requests"
results = "{prefix}.results"
dlq = "{prefix}.dlq"
adapters = "{prefix}.adapters"
partitions = {partitions}
[requests]
max_attempts = 3
retry_backoff_s = 0.1
progress_events = false
[state]
dir = "{state}"
ledger_url = "{ledger_url}"
[metrics]
port = 0
"""


class Results(threading.Thread):
    """Reads the results topic from the beginning, all along: every answer as a consumer sees it."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.answers: list[dict] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        try:
            parts = None
            while not parts and not self.stop.is_set():
                parts = consumer.partitions_for_topic(self.topic)
                time.sleep(0.2)
            tps = [TopicPartition(self.topic, p) for p in parts or ()]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            while not self.stop.is_set():
                for records in consumer.poll(timeout_ms=300).values():
                    with self.lock:
                        self.answers.extend({**json.loads(r.value), "_at": time.monotonic()} for r in records)
        finally:
            consumer.close()

    def answered(self) -> dict[str, float]:
        """request id -> when its first answer was read."""
        with self.lock:
            first: dict[str, float] = {}
            for a in self.answers:
                first.setdefault(a.get("request_id"), a["_at"])
            return first


class Replicas:
    """The replica processes: started, killed, stopped, each with its own metrics port and log."""

    def __init__(self, root: Path, config: Path, log_level: str = "INFO"):
        self.root, self.config, self.log_level = root, config, log_level
        self.procs: dict[str, tuple[subprocess.Popen, int]] = {}
        self.started = 0
        self.most_alive = 0  # the most replicas running at once

    def start(self, name: str, wait: bool = True) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARND")}
        env.update(UNLEARND_CONFIG=str(self.config), UNLEARND__METRICS__PORT=str(port), PYTHONUNBUFFERED="1",
                   UNLEARND__LOGGING__LEVEL=self.log_level)
        log = open(self.root / f"{name}.{self.started}.log", "wb")
        self.started += 1
        proc = subprocess.Popen(UNLEARND, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = (proc, port)
        self.most_alive = max(self.most_alive, len(self.alive()))
        if wait:
            self.wait_ready(name)

    def wait_ready(self, name: str, timeout: float = 180) -> None:
        proc, port = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"replica {name} exited ({proc.returncode}); see {self.root}")
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if "\nunlearnd_broker_connected 1.0" in text:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"replica {name} not ready after {timeout}s")

    def wait_consuming(self, name: str, timeout: float = 120) -> bool:
        """Until the replica holds partitions (it exports their lag): back in the group, not only connected."""
        proc, port = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if "\nunlearnd_consumer_lag{" in text:
                    return True
            except OSError:
                pass
            time.sleep(0.3)
        return False

    def kill(self, name: str) -> None:
        proc, _ = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self, name: str, timeout: float = 60) -> None:
        proc, _ = self.procs[name]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def rejoins(self) -> int:
        """How often a replica's watch found it holding nothing while requests waited (daemon/group_watch.py)."""
        return sum(log.read_text(errors="replace").count("rejoining the consumer group")
                   for log in self.root.glob("*.log"))

    def alive(self) -> list[str]:
        return [n for n, (p, _) in self.procs.items() if p.poll() is None]

    def stop_all(self) -> None:
        for name in self.alive():
            self.stop(name, timeout=30)


class Bench:
    def __init__(self, plan: dict, rng: random.Random, root: Path, bootstrap: str, ledger_url: str):
        self.plan, self.rng, self.root = plan, rng, root
        self.prefix = f"rep{uuid.uuid4().hex[:6]}"
        self.models = [f"digits-{i}" for i in range(plan["models"])]
        self.state = root / "shared"  # what every replica must share: the artifact store (and the ledger URL)
        self.ledger_url = ledger_url
        self.config = root / "config.toml"
        self.config.write_text(CONFIG.format(bootstrap=bootstrap, prefix=self.prefix, partitions=plan["partitions"],
                                             state=self.state, ledger_url=ledger_url)
                               + "".join(MODEL_CONFIG.format(name=m, seed=i, epochs=plan["epochs"])
                                       for i, m in enumerate(self.models)))
        self.bootstrap = bootstrap
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        self.results = Results(bootstrap, f"{self.prefix}.results")
        self.replicas = Replicas(root, self.config, plan.get("log_level", "INFO"))
        self.published: dict[str, dict] = {}
        self.next_sample = {m: 0 for m in self.models}
        self.kills = 0
        self.chaos_done = threading.Event()
        self.events: list[dict] = []

    def bootstrap_models(self) -> float:
        """Every model's first version, trained once into the shared ledger before any replica starts."""
        from adapters.store import ArtifactStore
        from daemon import config as config_mod
        from daemon.ledger import open_ledger
        from daemon.models import ModelRegistry

        t0 = time.perf_counter()
        cfg = config_mod.load(self.config, env={})
        ledger = open_ledger(cfg.state)
        registry = ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger)
        for m in self.models:
            registry.ensure_bootstrapped(m, progress=False)
        ledger.close()
        return time.perf_counter() - t0

    def publish(self, count: int, pause_s: float = 0.0) -> list[str]:
        ids = []
        for _ in range(count):
            model = self.models[len(self.published) % len(self.models)]
            rid = f"req-{len(self.published):04d}"
            sample = self.next_sample[model]
            self.next_sample[model] += 1
            body = {"request_id": rid, "model": model, "forget": {"sample_ids": [sample]}}
            keyed = self.rng.random() < 0.5
            self.producer.send(f"{self.prefix}.requests", key=model.encode() if keyed else None,
                               value=json.dumps(body).encode())
            self.published[rid] = {"model": model, "sample": sample, "keyed": keyed}
            ids.append(rid)
            if pause_s:
                self.producer.flush()
                time.sleep(pause_s)
        self.producer.flush()
        return ids

    def wait_answered(self, ids: list[str], timeout: float, since: float | None = None) -> float | None:
        """Seconds from `since` (default: now) until every id has an answer (None: timed out)."""
        t0 = time.monotonic() if since is None else since
        while time.monotonic() - t0 < timeout:
            answered = self.results.answered()
            if all(i in answered for i in ids):
                return max(answered[i] for i in ids) - t0
            time.sleep(0.2)
        return None

    def throughput(self) -> dict:
        """The same number of requests through 1 replica, then through 3 (each timed from its first publish)."""
        n = self.plan["throughput_requests"]
        if not n:  # --quick: the replicas start together, no timing
            for name in ("r0", "r1", "r2"):
                self.replicas.start(name, wait=False)
            for name in ("r0", "r1", "r2"):
                self.replicas.wait_ready(name)
            return {"requests": 0, "ratio": None}
        self.replicas.start("r0")
        warm = self.publish(len(self.models) * 2)  # first requests load each model: not counted, as below
        self.wait_answered(warm, timeout=300)
        t1 = self.wait_answered(self.publish(n), timeout=600)
        for name in ("r1", "r2"):
            self.replicas.start(name, wait=False)
        for name in ("r1", "r2"):
            self.replicas.wait_ready(name)
        # The group settles across 3 members before the clock starts: the rebalance the joins trigger (up to a
        # session timeout) and each new owner's first request of a model (loading it) are not counted.
        time.sleep(SESSION_TIMEOUT_S + 2)
        for _ in range(2):
            self.wait_answered(self.publish(len(self.models) * 2), timeout=300)
        t3 = self.wait_answered(self.publish(n), timeout=600)
        out = {"requests": n, "one_replica_s": t1, "three_replicas_s": t3}
        out["ratio"] = round(t1 / t3, 3) if t1 and t3 else None
        return out

    def _send_through_chaos(self, total: int) -> None:
        """At least `total` requests, one every send_pause_s for as long as the kills go on: traffic all along."""
        sent = 0
        while sent < total or (self.kills < self.plan["kills"] and not self.chaos_done.is_set()):
            self.publish(1)
            sent += 1
            if self.kills < self.plan["kills"]:
                time.sleep(self.plan["send_pause_s"])

    def chaos(self) -> dict:
        """Requests flow while replicas die and come back, one is added, and all are restarted in turn."""
        total, kills = self.plan["chaos_requests"], self.plan["kills"]
        before = len(self.published)
        sender = threading.Thread(target=self._send_through_chaos, args=(total,), daemon=True)
        self.replicas.stop("r2")  # from 2 replicas, so that one can be added mid-stream
        self.events.append({"at": "chaos start", "replicas": self.replicas.alive()})
        sender.start()
        t0 = time.monotonic()
        added = False
        while self.kills < kills:
            for name in self.replicas.alive():  # every kill hits a member at work, not one still starting
                self.replicas.wait_ready(name)
            time.sleep(self.rng.uniform(0.5, 3.0))
            if not added and self.kills >= kills // 2:
                self.replicas.start("r2", wait=False)
                self.events.append({"at": round(time.monotonic() - t0, 1), "added": "r2"})
                added = True
                continue
            victim = self.rng.choice(self.replicas.alive())
            self.replicas.kill(victim)
            self.kills += 1
            self.events.append({"at": round(time.monotonic() - t0, 1), "killed": victim})
            self.replicas.start(victim, wait=False)  # a supervisor restarts it
        self.chaos_done.set()
        for name in self.replicas.alive():
            self.replicas.wait_ready(name)
        # rolling restart: one at a time, the next once it is back
        for name in sorted(self.replicas.procs)[: self.plan["rolling"]]:
            self.replicas.stop(name)
            self.replicas.start(name)
            consuming = self.replicas.wait_consuming(name)
            self.events.append({"at": round(time.monotonic() - t0, 1), "restarted": name, "consuming": consuming})
        sender.join()
        # everything answered, or 4 minutes after the last restart (what is then unanswered is reported)
        drained = self.wait_answered(list(self.published), timeout=time.monotonic() - t0 + 240, since=t0)
        return {"requests": len(self.published) - before, "kills": self.kills, "all_answered_after_s": drained,
                "elapsed_s": round(time.monotonic() - t0, 1), "events": self.events}

    def run(self) -> dict:
        bootstrap_s = self.bootstrap_models()
        self.results.start()
        try:
            throughput = self.throughput()
            chaos = self.chaos()
        finally:
            self.replicas.stop_all()
            self.results.stop.set()
            self.results.join(10)
            self.producer.close()
        checks = check(self.ledger_url, self.state, self.models, self.published, self.results.answers)
        checks["unanswered_still_in_topic"] = pending_in_topic(self.bootstrap, self.prefix,
                                                               {x["id"] for x in checks["lost_detail"]})
        # What is still in the requests topic past the group's committed offset is not lost: a consumer that gets
        # its partition applies it. Lost = unanswered and not pending there.
        checks["lost"] = len(checks["lost_detail"]) - len(checks["unanswered_still_in_topic"])
        summary = {**{k: checks[k] for k in ("lost", "applied_twice", "forked_chains", "applied_not_in_head_lineage",
                                             "artifacts_unverified")},
                   "requests": len(self.published), "models": len(self.models), "kills": self.kills,
                   "replicas": self.replicas.most_alive, "replica_starts": self.replicas.started,
                   "throughput_1_vs_3_replicas": throughput["ratio"],
                   "unanswered_at_end": len(checks["lost_detail"]),
                   "unanswered_still_in_topic": len(checks["unanswered_still_in_topic"]),
                   "group_rejoins": self.replicas.rejoins()}
        summary["targets_met"] = (summary["lost"] == summary["applied_twice"] == summary["forked_chains"]
                                  == summary["applied_not_in_head_lineage"] == summary["artifacts_unverified"]
                                  == summary["unanswered_at_end"] == 0
                                  and summary["kills"] >= self.plan["kills"] and summary["replicas"] == 3)
        return {"plan": self.plan, "cores": os.cpu_count(), "bootstrap_s": round(bootstrap_s, 1),
                "throughput": throughput, "chaos": chaos, "checks": checks, "summary": summary}


def check(ledger_url: str, state: Path, models: list[str], published: dict[str, dict], answers: list[dict]) -> dict:
    """Everything the summary claims, from the ledger, the artifact store and the results topic."""
    from adapters.store import ArtifactStore, tree_sha256
    from daemon.ledger import Ledger
    from daemon.ledger_backends import PostgresTarget

    ledger = Ledger(PostgresTarget(ledger_url))
    store = ArtifactStore(state / "artifacts")
    lost, not_in_lineage, applied_twice, forked, unverified = [], [], [], 0, []
    lineages, versions_of_sample = {}, {}
    for m in models:
        head = ledger.head(m)
        lineage = {v.id for v in ledger.lineage(m, head.id)}
        versions = ledger.list_artifacts(m, "version")
        lineages[m] = lineage
        forked += sum(v.id not in lineage for v in versions)
        for v in versions:
            if tree_sha256(Path(v.path)) != v.sha256:
                unverified.append(f"{m}/{v.id}")
        for r in ledger.read_rows("SELECT artifact_id, sample_id FROM forgotten WHERE model = ?", (m,)):
            versions_of_sample.setdefault((m, r["sample_id"]), set()).add(r["artifact_id"])
    changed_versions: dict[str, set] = {}
    answered = set()
    for a in answers:
        rid = a.get("request_id")
        if a.get("status") == "applied":
            answered.add(rid)
            if a.get("changed"):
                changed_versions.setdefault(rid, set()).add(a.get("version"))
    for rid, p in published.items():
        row = ledger.get_request(rid)
        if row is None or row.status != "applied" or rid not in answered:
            lost.append({"id": rid, "model": p["model"], "keyed": p["keyed"], "ledger": row.status if row else None,
                         "answered": rid in answered})
            continue
        if row.artifact_id not in lineages[p["model"]]:
            not_in_lineage.append(rid)
        if len(versions_of_sample.get((p["model"], p["sample"]), ())) > 1 or len(changed_versions.get(rid, ())) > 1:
            applied_twice.append(rid)
    # Which partition each model's requests were applied from (keyed, or re-keyed by the daemon): how the models
    # spread over partitions, and so over replicas.
    partitions = {m: sorted({int(r["source"].split("/")[1]) for r in ledger.read_rows(
        "SELECT DISTINCT source FROM requests WHERE model = ? AND status = 'applied' AND source IS NOT NULL", (m,))
        if r["source"].split("/")[0].endswith(".requests")}) for m in models}
    published_versions = ledger.read_rows("SELECT COUNT(*) AS n FROM events WHERE kind = 'published'")[0]["n"]
    # Files of tries killed between their publish and their ledger commit (never read; see README, Scaling).
    orphans = sum(1 for m in models if (store.root / m / "versions").is_dir()
                  for d in (store.root / m / "versions").iterdir()
                  if d.is_dir() and ledger.get_artifact(m, d.name) is None)
    ledger.close()
    return {"lost": len(lost), "lost_detail": lost, "applied_twice": len(applied_twice),
            "applied_twice_ids": applied_twice[:20], "forked_chains": forked,
            "applied_not_in_head_lineage": len(not_in_lineage), "artifacts_unverified": len(unverified),
            "versions_published": published_versions,
            "partitions_of_models": partitions, "orphan_version_dirs": orphans}


def pending_in_topic(bootstrap: str, prefix: str, ids: set[str]) -> list[str]:
    """Of `ids`, those with a copy in the requests topic at or past the group's committed offset of its partition
    (not yet consumed: waiting for a member that holds that partition). Reads without joining the group."""
    if not ids:
        return []
    topic = f"{prefix}.requests"
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id="replicas", enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        committed = {tp: consumer.committed(tp) or 0 for tp in tps}
        consumer.assign(tps)
        consumer.seek_to_end(*tps)
        ends = {tp: consumer.position(tp) for tp in tps}
        consumer.seek_to_beginning(*tps)
        pending, deadline = set(), time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    try:
                        rid = json.loads(r.value).get("request_id")
                    except (ValueError, AttributeError):
                        continue
                    if rid in ids and r.offset >= committed[tp]:
                        pending.add(rid)
        return sorted(pending)
    finally:
        consumer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO"),
                    help="the replicas' log level (DEBUG includes kafka-python's group protocol, to see a stall)")
    args = ap.parse_args()
    bin_dir = find_bin_dir()
    if bin_dir is None:
        sys.exit("bench/replicas.py: PostgreSQL is not installed (initdb, pg_ctl): bash deploy/ci/install-tools.sh")
    plan = {**(QUICK if args.quick else FULL), "log_level": args.log_level}
    root = Path(tempfile.mkdtemp(prefix="unlearnd-replicas-"))
    result = None
    try:
        with EmbeddedBroker() as broker, PostgresServer(bin_dir) as pg:
            result = Bench(plan, random.Random(args.seed), root, broker.bootstrap_servers, pg.new_database()).run()
    finally:
        if result is not None and result["summary"]["targets_met"]:
            shutil.rmtree(root, ignore_errors=True)
        else:  # the replicas' logs, to see why
            print(f"bench/replicas.py: targets missed; replica logs kept in {root}", file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

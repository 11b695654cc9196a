"""Chaos: real daemon processes on a real broker, under kills, stops, a broker restart, a frozen broker and a full
disk, with valid requests and hostile messages interleaved. Prints JSON ending with a `summary` object.

    .venv/bin/python bench/chaos.py [--quick] [--out FILE] [--seed 0]

What it does (the full run; --quick does a little of each in about a minute):

- traffic: 200 valid deletion requests (some unkeyed, some sent twice, some repeating samples already forgotten
  under a new request id) and 5,000 hostile records from tests/hostile.py (every hostile case: deep JSON,
  huge integers, lone surrogates, null header values, oversize records, header keys that are not UTF-8, corrupt
  records and batches, wrong types...) interleaved, from a keyed producer and a raw protocol producer;
- stops: >= 30 kill -9s (at random moments, and targeted: mid-engine via `in_engine:hang`, between artifact and
  ledger via `after_artifact`, after the ledger, before the offset commit, during the group join) plus SIGTERMs,
  each followed by a restart, as a supervisor would;
- the broker: one stop and restart (Tansu is memory-only: it comes back empty) and one freeze (SIGSTOP);
- the disk: the state directory is a small tmpfs, filled until writes fail with ENOSPC, then freed. The bench
  re-runs itself in a user and mount namespace (`unshare`) to mount it; without one, the episode is left out and
  the summary says so.

The summary is computed from the ledger and artifact store, and from the results and dead-letter topics as a
consumer read them (bench/chaos_checks.py). Targets: lost 0, applied_twice 0, valid_failed 0, crashes_from_input 0,
bad_dead_lettered_share 1.0, chain_consistent true, recovery_s_max <= 30.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.chaos_checks import RECOVERY_TARGET_S, Seen, dead_letter_entry, dump, summarize  # noqa: E402
from daemon.broker import EmbeddedBroker, free_port  # noqa: E402
from tests.harness import CONFIG_TEMPLATE, TEST_MODEL, UNLEARND, fill_filesystem  # noqa: E402
from tests.hostile import RawProducer, corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NS_ENV = "UNLEARND_CHAOS_IN_NAMESPACE"
DISK_MB = 48
MAX_BYTES = 8192
FULL = {
    "valid": 200,
    "hostile": 5000,
    "traffic_s": 300,
    "random_kills": 14,
    "targeted": {
        "in_engine:hang": 4,
        "after_artifact": 4,
        "after_ledger": 3,
        "before_offset_commit": 3,
        "join_kill": 3,
        "join_term": 2,
    },
    "sigterms": 3,
    "freeze": True,
    "full_disk_s": 12,
}
QUICK = {"valid": 24, "hostile": 400, "traffic_s": 15, "random_kills": 0, "targeted": {"in_engine:hang": 1,
         "join_kill": 1}, "sigterms": 0, "freeze": False, "full_disk_s": 4}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    small_disk = _in_namespace_or_reexec()
    plan = QUICK if args.quick else FULL
    result = Chaos(plan, random.Random(args.seed), small_disk).run()
    text = dump(result)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def _in_namespace_or_reexec() -> str | None:
    """Run inside a private user+mount namespace (so a tmpfs can be mounted); returns why not, or None."""
    if os.environ.get(NS_ENV) == "1":
        return None
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"user namespaces are not available here: {probe.stderr.decode().strip()[:200]}"
    os.environ[NS_ENV] = "1"
    os.execvp("unshare", ["unshare", "--user", "--map-root-user", "--mount", sys.executable, *sys.argv])
    return None  # not reached


class Collector(threading.Thread):
    """Reads the results and dead-letter topics as they are written, across broker restarts (epochs)."""

    def __init__(self, bootstrap: str, prefix: str):
        super().__init__(daemon=True)
        self.bootstrap, self.prefix = bootstrap, prefix
        self.seen = Seen()
        self.epoch = 0  # bumped by the bench when it restarts the broker
        self.stop = threading.Event()
        self._offsets: set = set()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            epoch = self.epoch
            try:
                self._read(epoch)
            except Exception:  # the broker is down or frozen: try again
                time.sleep(0.5)

    def _read(self, epoch: int) -> None:
        names = [f"{self.prefix}.results", f"{self.prefix}.dlq"]
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
        try:
            parts = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(None)}
        finally:
            admin.close()
        if not all(n in parts for n in names):
            time.sleep(0.3)
            return
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                 allow_auto_create_topics=False, request_timeout_ms=5000)
        try:
            tps = [TopicPartition(n, p) for n in names for p in range(parts[n])]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            while not self.stop.is_set() and self.epoch == epoch:
                for records in consumer.poll(timeout_ms=300).values():
                    for r in records:
                        self._add(epoch, r)
        finally:
            consumer.close()

    def _add(self, epoch: int, r) -> None:
        key = (epoch, r.topic, r.partition, r.offset)
        with self.lock:
            if key in self._offsets:
                return
            self._offsets.add(key)
            if r.topic.endswith(".results"):
                self.seen.results.append({**json.loads(r.value), "_epoch": epoch})
            else:
                self.seen.dead.append(dead_letter_entry(epoch, dict(r.headers or [])))

    def answered_ids(self) -> set[str]:
        with self.lock:
            return {r.get("request_id") for r in self.seen.results}

    def dead_sources(self) -> set[tuple[int, str]]:
        with self.lock:
            return {(d["epoch"], d["source"]) for d in self.seen.dead}

    def answers_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for a in self.seen.answer_times() if a >= t)


class Chaos:
    def __init__(self, plan: dict, rng: random.Random, small_disk_unavailable: str | None):
        self.plan, self.rng = plan, rng
        self.root = Path(tempfile.mkdtemp(prefix="unlearnd-chaos-"))
        self.small_disk_unavailable = small_disk_unavailable
        self.state = self.root / "var"
        self.prefix = f"chaos{rng.randrange(10**6)}"
        self.broker = EmbeddedBroker(free_port())
        self.metrics_port = free_port()
        self.valid: dict[str, dict] = {}
        self.hostile: dict[tuple[int, str], str] = {}
        self.starts: list[dict] = []
        self.unexpected_exits: list[dict] = []
        self.events: list[dict] = []
        self.proc: subprocess.Popen | None = None
        self.expected_exit = False
        self.paused_traffic = threading.Event()
        self.traffic_idle = threading.Event()
        self.stop_traffic = threading.Event()
        self.schedule_done = threading.Event()
        self.next_sample = 0
        self.episodes: dict = {}

    # --- setup ----------------------------------------------------------------------------------------------

    def _prepare_state(self) -> None:
        self.state.mkdir()
        if self.small_disk_unavailable is None:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(self.state)], check=True)
        config = self.root / "config.toml"
        config.write_text(
            CONFIG_TEMPLATE.format(
                bootstrap=self.broker.bootstrap_servers,
                group=f"{self.prefix}-group",
                prefix=self.prefix,
                state=self.state,
                metrics_port=self.metrics_port,
                model=TEST_MODEL,
            )
            .replace("max_attempts = 2", "max_attempts = 3\ntransient_backoff_max_s = 2.0")
            .replace("epochs = 12", "epochs = 3")  # the model's accuracy is not what this bench measures
            .replace(
                "poll_timeout_ms = 200", "poll_timeout_ms = 200\nliveness_interval_s = 1.0\nliveness_timeout_s = 2.0"
            )
        )
        self.config = config
        from adapters.store import ArtifactStore
        from daemon import config as config_mod
        from daemon.ledger import Ledger
        from daemon.models import ModelRegistry

        cfg = config_mod.load(config, env={})
        ledger = Ledger(cfg.state.ledger_path)
        ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger).ensure_bootstrapped(TEST_MODEL,
                                                                                               progress=False)
        ledger.close()

    # --- daemons --------------------------------------------------------------------------------------------

    def _start(self, failpoint: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARND")}
        env.update(UNLEARND_CONFIG=str(self.config), PYTHONUNBUFFERED="1")
        if failpoint:
            env["UNLEARND_FAILPOINT"] = failpoint
        self.log = self.root / f"daemon-{len(self.starts)}.log"
        self.proc = subprocess.Popen([*UNLEARND, "run"], cwd=REPO, env=env, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT)
        self.expected_exit = failpoint is not None and ":hang" not in failpoint  # it kills itself
        self.starts.append({"at": time.time(), "stopped_at": None, "how": None, "failpoint": failpoint})
        return self.proc

    def _stop(self, how: str) -> None:
        """kill -9 or SIGTERM the daemon in hand and record it; a daemon that died on its own is a crash."""
        proc, start = self.proc, self.starts[-1]
        if proc.poll() is None:
            self.expected_exit = True
            proc.send_signal(signal.SIGKILL if how.startswith("kill") else signal.SIGTERM)
            proc.wait(120)
        elif not self.expected_exit:
            self._unexpected(proc)
        start["stopped_at"], start["how"] = time.time(), how
        self.events.append({"at": round(time.time(), 3), "event": how, "exit": proc.returncode})

    def _unexpected(self, proc) -> None:
        tail = self.log.read_text(errors="replace").splitlines()[-15:]
        self.unexpected_exits.append({"exit": proc.returncode, "log_tail": tail})

    def _wait_log(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text(errors="replace"):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def _wait_answer(self, since: float, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.collector.answers_since(since) > 0:
                return True
            if self.proc.poll() is not None and not self.expected_exit:
                return False
            time.sleep(0.1)
        return False

    def _metric(self, name: str, **labels) -> float | None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return None

    # --- traffic --------------------------------------------------------------------------------------------

    def _traffic(self) -> None:
        """Valid requests and hostile records, interleaved, spread over the planned time; then a valid request now
        and then until the chaos schedule is done (a failpoint needs requests to fire on)."""
        per_valid = max(1, self.plan["hostile"] // self.plan["valid"])
        interval = self.plan["traffic_s"] / self.plan["valid"]
        producer = raw = pending = None
        n_hostile, cases = 0, []
        while not self.stop_traffic.is_set():
            if self.paused_traffic.is_set():
                # Our clients go while paused: Tansu ignores allow_auto_create_topics, so a producer's metadata
                # refresh naming the requests topic would re-create it on a restarted broker before the daemon does.
                _close(producer, raw)
                producer = raw = None
                self.traffic_idle.set()
                time.sleep(0.1)
                continue
            self.traffic_idle.clear()
            planned_done = len(self.valid) >= self.plan["valid"] and n_hostile >= self.plan["hostile"]
            if planned_done and self.schedule_done.is_set():
                break
            try:
                if producer is None:
                    self._wait_topics()
                    producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap_servers, acks="all",
                                             allow_auto_create_topics=False, max_block_ms=5000)
                    raw = RawProducer(self.broker.bootstrap_servers)
                pending = pending or self._next_valid()
                self._send_valid(producer, pending)
                pending = None
                for _ in range(per_valid if not planned_done else 0):
                    if n_hostile >= self.plan["hostile"]:
                        break
                    if not cases:
                        cases = corpus(MAX_BYTES, tag=f"c{n_hostile}")
                    case = cases.pop(self.rng.randrange(len(cases)))
                    partition = self.rng.randrange(2)
                    epoch = self.collector.epoch
                    offset = raw.send_hostile(f"{self.prefix}.requests", partition, case)
                    self.hostile[(epoch, f"{self.prefix}.requests/{partition}/{offset}")] = case.reason
                    n_hostile += 1
                time.sleep(interval * self.rng.uniform(0.5, 1.5) if not planned_done else 1.5)
            except Exception as exc:  # the broker is away or frozen: reconnect and re-send, as a producer would
                self.events.append({"at": round(time.time(), 3), "event": "producer_error", "error": repr(exc)[:200]})
                _close(producer, raw)
                producer = raw = None
                time.sleep(1.0)
        _close(producer, raw)
        self.traffic_idle.set()

    def _next_valid(self) -> dict:
        n = len(self.valid)
        answered = [rid for rid in self.collector.answered_ids() if rid in self.valid and
                    not self.valid[rid].get("repeat_of")]
        roll = self.rng.random()
        if roll < 0.06 and answered:  # the same samples again under a new id: already forgotten
            of = self.rng.choice(sorted(answered))
            rid, samples, extra = f"valid-{n}", self.valid[of]["samples"], {"repeat_of": of}
        else:
            rid, samples, extra = f"valid-{n}", [self.next_sample, self.next_sample + 1], {}
            self.next_sample += 2
        body = json.dumps({"request_id": rid, "model": TEST_MODEL, "forget": {"sample_ids": samples}}).encode()
        key = None if roll > 0.9 else TEST_MODEL.encode()  # some producers do not key by model
        return {"rid": rid, "samples": samples, "body": body, "key": key, "twice": 0.85 < roll <= 0.9, **extra}

    def _send_valid(self, producer: KafkaProducer, v: dict) -> None:
        """Sent until acknowledged (a real producer retries); counted once it is."""
        producer.send(f"{self.prefix}.requests", key=v["key"], value=v["body"]).get(10)
        self.valid[v["rid"]] = {"samples": v["samples"], **({"repeat_of": v["repeat_of"]} if "repeat_of" in v
                                                             else {})}
        if v["twice"]:  # a producer that retries a send it thinks was lost
            producer.send(f"{self.prefix}.requests", key=v["key"], value=v["body"]).get(10)

    def _wait_topics(self) -> None:
        """Producers wait for the daemon to have (re-)created the topics: Tansu would auto-create them otherwise."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self.stop_traffic.is_set():
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap_servers, request_timeout_ms=3000)
                try:
                    names = {d["name"] for d in admin.describe_topics(None)}
                finally:
                    admin.close()
                if f"{self.prefix}.requests" in names:
                    return
            except Exception:
                pass
            time.sleep(0.5)

    # --- episodes -------------------------------------------------------------------------------------------

    def _drain(self, timeout: float = 90) -> bool:
        """Wait until every valid request sent so far has a result and every hostile record a dead letter."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            missing_valid = set(self.valid) - self.collector.answered_ids()
            missing_dead = set(self.hostile) - self.collector.dead_sources()
            if not missing_valid and not missing_dead:
                return True
            self._keep_daemon_up()
            time.sleep(0.5)
        return False

    def _keep_daemon_up(self) -> None:
        if self.proc.poll() is not None:  # a failpoint killed it (expected) or it crashed (not): restart
            self._stop("exited")
            self._start()

    def _broker_restart(self) -> None:
        """Stop the broker once everything sent so far is answered (it comes back empty: what it held is gone, not
        the daemon's to lose), and restart it on the same port."""
        self.paused_traffic.set()
        self.traffic_idle.wait(60)
        drained = self._drain()
        self.broker.stop()
        stopped = time.monotonic()
        detected = None
        while time.monotonic() - stopped < 30:
            if self._metric("unlearnd_broker_connected") == 0.0:
                detected = time.monotonic() - stopped
                break
            time.sleep(0.25)
        time.sleep(2)
        self.collector.epoch += 1
        self.broker = EmbeddedBroker(self.broker.port).start()
        back = time.time()
        self.paused_traffic.clear()
        answered = self._wait_answer(back, 120)
        parts = {}
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap_servers)
            parts = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(None)}
            admin.close()
        except Exception:
            pass
        first = next((a for a in self.collector.seen.answer_times() if a >= back), None)
        self.episodes["broker_restart"] = {
            "drained_before": drained, "loss_detected_s": round(detected, 1) if detected is not None else None,
            "first_answer_after_restart_s": round(first - back, 2) if answered and first else None,
            "requests_topic_partitions_after": parts.get(f"{self.prefix}.requests")}

    def _broker_freeze(self) -> None:
        os.kill(self.broker.process.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        detected = None
        try:
            while time.monotonic() - frozen < 45:
                if self._metric("unlearnd_broker_connected") == 0.0:
                    detected = time.monotonic() - frozen
                    break
                time.sleep(0.25)
        finally:
            os.kill(self.broker.process.pid, signal.SIGCONT)
        thawed = time.time()
        self.episodes["broker_freeze"] = {"detected_s": round(detected, 1) if detected else None,
                                          "answering_again": self._wait_answer(thawed, 120)}

    def _full_disk(self) -> None:
        if self.small_disk_unavailable is not None:
            self.episodes["full_disk"] = {"ran": False, "why": self.small_disk_unavailable}
            return
        filler = self.state / "filler"
        written = fill_filesystem(filler)
        filled, paused_seen = time.monotonic(), None  # hold until the daemon has paused, then a while longer
        while time.monotonic() - filled < 60 and paused_seen is None:
            if self._metric("unlearnd_paused", reason="disk_full") == 1.0:
                paused_seen = round(time.monotonic() - filled, 1)
            self._keep_daemon_up()
            time.sleep(0.2)
        time.sleep(self.plan["full_disk_s"])
        self._keep_daemon_up()
        filler.unlink()
        freed = time.time()
        self.episodes["full_disk"] = {"ran": True, "filesystem": f"tmpfs, {DISK_MB} MiB", "filled_bytes": written,
                                      "write_error": "ENOSPC", "paused_after_s": paused_seen,
                                      "answering_after_freed": self._wait_answer(freed, 120)}

    # --- the run --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        t0 = time.time()
        self.broker.start()
        try:
            self._prepare_state()
            self.collector = Collector(self.broker.bootstrap_servers, self.prefix)
            self.collector.start()
            self._start()
            if not self._wait_log("connected to", 120):
                raise RuntimeError("the first daemon did not connect:\n" + self.log.read_text(errors="replace"))
            traffic = threading.Thread(target=self._traffic, daemon=True)
            traffic.start()
            self._wait_answer(self.starts[-1]["at"], 120)
            for step in self._schedule():
                step()
            self.schedule_done.set()
            traffic.join(timeout=900)
            self.stop_traffic.set()
            drained = self._drain(180)
            self._stop("sigterm (end)")
            if self.proc.returncode not in (0,):
                self._unexpected(self.proc)
        finally:
            self.stop_traffic.set()
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            if hasattr(self, "collector"):
                self.collector.stop.set()
            self.broker.stop()
        summary = summarize(state=self.state, model=TEST_MODEL, valid=self.valid, hostile=self.hostile,
                            seen=self.collector.seen, starts=self.starts, unexpected_exits=self.unexpected_exits)
        kills = [e for e in self.events if e["event"].startswith("kill") or e["event"] == "exited"]
        summary.update({
            "kill9s": sum(1 for s in self.starts if s["how"] and (s["how"].startswith("kill") or
                                                                  s["how"] == "exited")),
            "sigterms": sum(1 for s in self.starts if s["how"] and s["how"].startswith("sigterm")),
            "broker_restarts": 1, "broker_freezes": int(self.plan["freeze"]),
            "full_disk_episode": self.episodes.get("full_disk", {}).get("ran", False),
            "drained_at_end": drained, "duration_s": round(time.time() - t0, 1),
        })
        summary["targets_met"] = (summary["lost"] == 0 and summary["applied_twice"] == 0
                                  and summary["valid_failed"] == 0 and summary["crashes_from_input"] == 0
                                  and summary["bad_dead_lettered_share"] == 1.0 and summary["chain_consistent"]
                                  and summary["recovery_s_max"] is not None
                                  and summary["recovery_s_max"] <= RECOVERY_TARGET_S)
        out = {"plan": {k: v for k, v in self.plan.items()}, "episodes": self.episodes,
               "stops": [{"how": s["how"], "failpoint": s["failpoint"]} for s in self.starts],
               "unexpected_exits": self.unexpected_exits, "events": kills[-60:], "summary": summary}
        if summary["targets_met"] and os.environ.get("UNLEARND_CHAOS_KEEP") != "1":
            if self.small_disk_unavailable is None:
                subprocess.run(["umount", str(self.state)], check=False)
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            out["kept_for_inspection"] = str(self.root)
        return out

    def _schedule(self):
        """The stops and episodes in a shuffled order; the broker restart in the middle, the disk near the end."""
        steps = [self._random_kill] * self.plan["random_kills"] + [self._sigterm] * self.plan["sigterms"]
        for kind, n in self.plan["targeted"].items():
            steps += [lambda kind=kind: self._targeted(kind)] * n
        self.rng.shuffle(steps)
        middle = len(steps) // 2
        steps.insert(middle, self._broker_restart)
        if self.plan["freeze"]:
            steps.insert(middle // 2, self._broker_freeze)
        steps.insert(max(len(steps) - 2, 0), self._full_disk)
        return steps

    def _restart(self, failpoint: str | None = None) -> float:
        self._start(failpoint)
        return self.starts[-1]["at"]

    def _random_kill(self) -> None:
        """kill -9 at a random moment of a daemon that has been answering."""
        time.sleep(self.rng.uniform(0.2, 3.0))
        self._stop("kill -9 (random)")
        self._wait_answer(self._restart(), 90)

    def _sigterm(self) -> None:
        time.sleep(self.rng.uniform(0.2, 3.0))
        self._stop("sigterm (random)")
        self._wait_answer(self._restart(), 90)

    def _targeted(self, kind: str) -> None:
        if kind in ("join_kill", "join_term"):
            self._stop("kill -9 (before restart)")
            self._restart()
            self._wait_log("connected to", 120)  # its first poll, the group join, starts now
            self._stop("kill -9 (during the join)" if kind == "join_kill" else "sigterm (during the join)")
            self._wait_answer(self._restart(), 90)
            return
        self._stop("kill -9 (before restart)")
        self._restart(kind)
        if kind.endswith(":hang"):  # mid-engine: wait until a request is inside the engine, then kill
            self._wait_log("failpoint in_engine: hanging", 90)
            self._stop("kill -9 (mid-engine)")
        else:  # the daemon SIGKILLs itself at the failpoint
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                pass
            self._stop(f"kill -9 ({kind})")
        self._wait_answer(self._restart(), 90)


def _close(*clients) -> None:
    for client in clients:
        try:
            if client is not None:
                client.close()
        except Exception:  # closing a client of a dead broker may fail; nothing is lost by it
            pass


if __name__ == "__main__":
    main()

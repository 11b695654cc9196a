"""Shared test harness: a real Kafka-protocol broker process, real daemon processes, real SQLite and files.

`Stack` gives each test its own topics, consumer group and state directory on one session-wide broker, and a
handle to start/kill daemons and read what they wrote. The fixtures that build it are in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from adapters.store import ArtifactStore
from daemon import config as config_mod
from daemon.broker import free_port, stop_process
from daemon.ledger import Ledger
from daemon.models import ModelRegistry

REPO = Path(__file__).resolve().parents[1]
UNLEARND = [sys.executable, "-m", "daemon.cli"]
TEST_MODEL = "digits-mlp"

CONFIG_TEMPLATE = """
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
session_timeout_ms = 6000
poll_timeout_ms = 200
[kafka.topics]
requests = "{prefix}.requests"
results = "{prefix}.results"
dlq = "{prefix}.dlq"
adapters = "{prefix}.adapters"
partitions = 2
[requests]
max_bytes = 8192
max_attempts = 2
retry_backoff_s = 0.1
[state]
dir = "{state}"
[metrics]
port = {metrics_port}
[models.{model}]
kind = "classifier"
method = "iau"
[models.{model}.bootstrap]
recipe = "classifier"
dataset = "digits"
arch = "mlp"
hidden = [64]
epochs = 30
"""


class Stack:
    """One test's slice of the world: topics, group, state dir, config file, daemon processes."""

    def __init__(self, root: Path, bootstrap: str, state_template: Path):
        self.root = root
        self.bootstrap = bootstrap
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.state = root / "var"
        shutil.copytree(state_template, self.state)
        self.metrics_port = free_port()
        self.config_path = root / "config.toml"
        self.write_config()
        self.procs: list[subprocess.Popen] = []
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")

    def write_config(self, **extra_env) -> None:
        self.config_path.write_text(CONFIG_TEMPLATE.format(
            bootstrap=self.bootstrap, group=f"{self.prefix}-group", prefix=self.prefix, state=self.state,
            metrics_port=self.metrics_port, model=TEST_MODEL))

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    # --- processes ------------------------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARND")}
        env.update({"UNLEARND_CONFIG": str(self.config_path), "PYTHONUNBUFFERED": "1"}, **extra)
        return env

    def start(self, wait_ready: bool = True, *, config: Path | None = None, prefix: tuple[str, ...] = (),
              **env: str) -> subprocess.Popen:
        """A daemon process (`config`: another replica's config file; `prefix`: a command to run it under)."""
        log = open(self.root / f"daemon-{len(self.procs)}.log", "wb")
        environ = self.env(**env)
        if config is not None:
            environ["UNLEARND_CONFIG"] = str(config)
        proc = subprocess.Popen([*prefix, *UNLEARND, "run"], cwd=REPO, env=environ, stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        if wait_ready:
            self.wait_metric("unlearnd_broker_connected", 1.0, timeout=60, proc=proc)
        return proc

    def replica(self, name: str, state_template: Path) -> tuple[Path, int]:
        """Config of a second daemon in the same group, with its own state directory: (config path, metrics port)."""
        state = self.root / f"var-{name}"
        shutil.copytree(state_template, state)
        port = free_port()
        path = self.root / f"config-{name}.toml"
        path.write_text(CONFIG_TEMPLATE.format(
            bootstrap=self.bootstrap, group=f"{self.prefix}-group", prefix=self.prefix, state=state,
            metrics_port=port, model=TEST_MODEL))
        return path, port

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run([*UNLEARND, *args], cwd=REPO, env=self.env(), capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"unlearnd {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def log(self, index: int = -1) -> str:
        return (self.root / f"daemon-{index % len(self.procs)}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs:
            stop_process(p, 20)

    # --- metrics --------------------------------------------------------------------------------------------

    def scrape(self, port: int | None = None) -> str:
        port = port or self.metrics_port
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()

    def metric(self, name: str, *, port: int | None = None, **labels: str) -> float | None:
        """The value of one series in a live scrape, or None if the daemon does not export it (yet)."""
        for family in text_string_to_metric_families(self.scrape(port)):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return None

    def wait_metric(self, name: str, value: float, timeout: float = 30, proc=None, port: int | None = None,
                    **labels) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"daemon exited ({proc.returncode}) before {name} = {value}:\n{self.log()}")
            try:
                if self.metric(name, port=port, **labels) == value:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{name}{labels} never reached {value}")

    # --- Kafka ----------------------------------------------------------------------------------------------

    def publish(self, body: dict | bytes | None, key: str | None = TEST_MODEL, headers=None) -> None:
        value = json.dumps(body).encode() if isinstance(body, dict) else body
        self._producer.send(self.topic("requests"), key=key.encode() if key else None, value=value,
                            headers=headers or []).get(10)

    def read(self, name: str, count: int, timeout: float = 60, where=None) -> list:
        """The first `count` records of a topic (optionally matching `where(record)`), from the beginning."""
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        topic = self.topic(name)
        deadline = time.monotonic() + timeout
        try:
            parts = None
            while not parts and time.monotonic() < deadline:
                parts = consumer.partitions_for_topic(topic)
                if not parts:
                    time.sleep(0.3)
            tps = [TopicPartition(topic, p) for p in parts or ()]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            found = []
            while len(found) < count and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=300).values():
                    found.extend(r for r in records if where is None or where(r))
            return found
        finally:
            consumer.close()

    def results(self, count: int, timeout: float = 60, request_id: str | None = None) -> list[dict]:
        """Result events (one per request), without the progress events long requests also publish there."""
        def match(r) -> bool:
            return not is_progress_record(r) and (
                request_id is None or json.loads(r.value).get("request_id") == request_id
            )

        return [json.loads(r.value) for r in self.read("results", count, timeout, match)]

    def progress(self, request_id: str, count: int, timeout: float = 10) -> list[dict]:
        """The progress events of one request, in order."""
        def match(r) -> bool:
            return is_progress_record(r) and json.loads(r.value).get("request_id") == request_id
        return [json.loads(r.value) for r in self.read("results", count, timeout, match)]

    def ledger(self):
        from daemon.ledger import Ledger

        return Ledger(self.state / "ledger.sqlite3")

    def close(self) -> None:
        self.stop_all()
        self._producer.close()


def fill_filesystem(path) -> int:
    """Write zeros to `path` until its filesystem is full (ENOSPC); returns the bytes written."""
    import errno

    written = 0
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                written += fh.write(b"\0" * (1 << 20))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return written


def is_progress_record(record) -> bool:
    from daemon.kafka_io import HEADER_EVENT

    return dict(record.headers or []).get(HEADER_EVENT) == b"progress"


def request(request_id: str | None = None, **forget) -> dict:
    """A valid request body for the test model."""
    return {"request_id": request_id or f"r-{uuid.uuid4().hex[:10]}", "model": TEST_MODEL,
            "forget": forget or {"sample_ids": [1, 2, 3]}}


def registry_from(tmp_path: Path, toml: str) -> ModelRegistry:
    """A ModelRegistry over the config.toml text `toml`, with its own artifact store and SQLite ledger in tmp_path
    (no environment overrides)."""
    path = tmp_path / "config.toml"
    path.write_text(toml)
    cfg = config_mod.load(path, env={})
    return ModelRegistry(cfg, ArtifactStore(tmp_path / "artifacts"), Ledger(tmp_path / "ledger.sqlite3"))

"""Live checks: a real daemon (`unlearnd run`, embedded broker) applies a request; promtool lints its scrape; a real
Prometheus server (Debian's package) on loopback scrapes it with the shipped scrape job and evaluates the shipped
alert rules and every dashboard query against it.

Tests run in file order and share one daemon and one Prometheus (module scope); the last one stops the daemon
with SIGTERM and checks the clean exit the Kubernetes/compose/systemd grace periods rely on.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    METRICS_ON,
    OPENS,
    PROM_CONFIG,
    RULES,
    all_queries,
    concrete,
    registry,
    require_tool,
    sample_to_family,
    selectors,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import TEST_MODEL as MODEL
from tests.harness import Stack, request

ROUTED_MODEL = "router-lm"  # the language model the route-only router serves (no weights: it routes only)

REQUEST_ID = "deploy-live-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-4000:] if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def unlearnd_cli() -> str:
    cli = Path(sys.executable).parent / "unlearnd"
    assert cli.is_file(), f"the `unlearnd` console script is not installed next to {sys.executable} (pip install -e .)"
    return str(cli)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, broker, bootstrapped_state):
    """A real daemon process from the shared harness (tests/harness.py: session broker, pre-trained digits model)
    that has applied one request and dead-lettered one malformed message."""
    stack = Stack(tmp_path_factory.mktemp("deploy-live"), broker.bootstrap_servers, bootstrapped_state)
    try:
        proc = stack.start()
        stack.publish(request(REQUEST_ID))
        stack.publish(b"{this is not json")
        stack.wait_metric("unlearnd_requests_total", 1.0, timeout=180, proc=proc,
                          model=MODEL, method="iau", status="applied")
        stack.wait_metric("unlearnd_dlq_total", 1.0, timeout=60, proc=proc, reason="invalid_json")
        yield {"stack": stack, "proc": proc, "metrics_port": stack.metrics_port,
               "url": f"http://127.0.0.1:{stack.metrics_port}/metrics"}
    finally:
        stack.close()


@pytest.fixture(scope="module")
def scrape(daemon) -> str:
    return http_get(daemon["url"])


@pytest.fixture(scope="module")
def prometheus(daemon, tmp_path_factory):
    """Debian's Prometheus on a free loopback port: the shipped daemon scrape job aimed at the live daemon, the
    shipped rules file, 1 s intervals."""
    binary = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    shipped = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in shipped["scrape_configs"] if j["static_configs"][0]["labels"]["component"] == "daemon")
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{daemon['metrics_port']}"]
    job["scrape_interval"] = "1s"
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)], "scrape_configs": [job]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("Prometheus to be ready", lambda: "Ready" in http_get(f"{base}/-/ready"), 60, proc, log)
        yield {"base": base, "job": job["job_name"], "log": log}
    finally:
        stop(proc)


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(http_get(url))
    except urllib.error.HTTPError as exc:  # 400 = PromQL the server rejects
        return json.loads(exc.read().decode())


def test_health_command_passes_on_live_daemon(daemon):
    """`unlearnd health`, the image's HEALTHCHECK and the k8s readiness probe, passes against the live daemon."""
    res = subprocess.run([unlearnd_cli(), "health", "--config", str(daemon["stack"].config_path)],
                         capture_output=True, text=True, timeout=60, env=daemon["stack"].env())
    assert res.returncode == 0, res.stdout + res.stderr


# ---- (c) promtool check metrics on a live scrape ---------------------------------------------------------------

def test_promtool_check_metrics_on_live_scrape(scrape):
    promtool = require_tool("promtool")
    res = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"promtool check metrics found problems:\n{res.stdout}{res.stderr}"


# ---- (b) every metric the rules and dashboards use is really exported ------------------------------------------

def test_live_scrape_exports_the_whole_registry(scrape):
    live = {f.name for f in text_string_to_metric_families(scrape)}
    missing = set(registry()) - live
    assert not missing, f"daemon/metrics.py defines families the running daemon does not export: {missing}"


def test_queried_metrics_are_in_the_live_scrape(scrape):
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    by_sample = sample_to_family(registry())
    for where, expr in all_queries().items():
        for sample, _labels in selectors(expr):
            assert by_sample.get(sample) in families, f"{where}: {sample} is not in the live daemon's /metrics"


def test_applied_request_shows_in_the_scrape(daemon, scrape):
    samples = [s for f in text_string_to_metric_families(scrape) for s in f.samples]
    def value(name, **labels):
        return [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert value("unlearnd_requests_total", model=MODEL, status="applied") == [1.0]
    assert value("unlearnd_dlq_total", reason="invalid_json") == [1.0]
    assert value("unlearnd_request_duration_seconds_count", model=MODEL) == [1.0]
    assert value("unlearnd_broker_connected") == [1.0]
    assert value("unlearnd_last_applied_timestamp_seconds", model=MODEL)[0] > time.time() - 3600
    assert value("unlearnd_consumer_lag", topic=daemon["stack"].topic("requests")) == [0.0, 0.0]  # 2 partitions


# ---- (d) a real Prometheus scrapes the daemon; the shipped rules and dashboard queries evaluate ----------------

def test_prometheus_query_api_returns_requests_total(prometheus):
    def sample():
        res = query(prometheus["base"], f'unlearnd_requests_total{{model="{MODEL}", status="applied"}}')
        return res["status"] == "success" and res["data"]["result"]
    result = wait_for("unlearnd_requests_total in Prometheus", sample, 60, log=prometheus["log"])
    assert len(result) == 1
    metric, (_ts, value) = result[0]["metric"], result[0]["value"]
    assert float(value) == 1.0
    assert metric["__name__"] == "unlearnd_requests_total"
    assert metric["method"] == "iau" and metric["component"] == "daemon" and metric["job"] == prometheus["job"]
    targets = json.loads(http_get(f"{prometheus['base']}/api/v1/targets"))["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"]


def test_shipped_rules_load_and_evaluate_cleanly(prometheus):
    def evaluated():
        groups = json.loads(http_get(f"{prometheus['base']}/api/v1/rules"))["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = rules and all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return done and rules
    rules = wait_for("every alert rule to be evaluated", evaluated, 60, log=prometheus["log"])
    expected = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {r["name"] for r in rules} == expected
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, f"rules failing to evaluate: {bad}"
    # a healthy daemon with nothing waiting fires none of them
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert not firing, f"alerts firing against a healthy daemon: {firing}"


@pytest.mark.parametrize("where", sorted(all_queries()))
def test_every_query_is_valid_promql_on_the_live_server(prometheus, where):
    expr = concrete(all_queries()[where])
    res = query(prometheus["base"], expr)
    assert res["status"] == "success", f"{where}: Prometheus rejected {expr!r}: {res.get('error')}"


def test_dashboard_requests_by_status_has_data(prometheus):
    """The dashboard's headline panel, as Grafana would query it, returns the applied series."""
    exprs = {k: v for k, v in all_queries().items() if "Requests by status" in k}
    expr = concrete(next(iter(exprs.values()))).replace("rate(", "increase(").replace("[1m]", "[5m]")
    def has_applied():
        res = query(prometheus["base"], expr)
        return [r for r in res["data"]["result"] if r["metric"].get("status") == "applied"]
    wait_for("the requests-by-status panel to show the applied request", has_applied, 60, log=prometheus["log"])


# ---- the ports the processes really open (the deploy files are checked against OPENS / METRICS_ON) -------------

def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def router(daemon, tmp_path_factory):
    """A real `unlearnd serve --route-only` on the live daemon's state, with serve.port and metrics.port set to
    two free ports, so the test sees which of them the process opens. Its config adds a language model (serve takes
    only those; a route-only router loads no weights) to the daemon's."""
    stack = daemon["stack"]
    ports = {"serve.port": free_port(), "metrics.port": free_port()}
    folder = tmp_path_factory.mktemp("router")
    log, config = folder / "router.log", folder / "config.toml"
    config.write_text(stack.config_path.read_text() + f'\n[models.{ROUTED_MODEL}]\nkind = "causal_lm"\n')
    env = stack.env(UNLEARND__SERVE__PORT=str(ports["serve.port"]), UNLEARND__METRICS__PORT=str(ports["metrics.port"]))
    with open(log, "wb") as out:
        proc = subprocess.Popen([unlearnd_cli(), "serve", ROUTED_MODEL, "--route-only", "--config", str(config)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("unlearnd serve to answer", lambda: http_get(f"http://127.0.0.1:{ports['serve.port']}/metrics"),
                 180, proc, log)
        yield {"ports": ports, "proc": proc}
    finally:
        stop(proc)


def test_processes_open_the_ports_the_deploy_files_use(daemon, router):
    live = {"daemon": {"metrics.port": daemon["metrics_port"]}, "router": router["ports"]}
    for component, ports in live.items():
        opened = {key for key, port in ports.items() if listening(port)}
        assert opened == set(OPENS[component]), f"{component} opens {opened}, deploy files assume {OPENS[component]}"
        scrape = http_get(f"http://127.0.0.1:{ports[METRICS_ON[component]]}/metrics")
        assert "unlearnd_" in scrape, f"{component}: no unlearnd metrics on {METRICS_ON[component]}"
    router_scrape = http_get(f"http://127.0.0.1:{router['ports']['serve.port']}/metrics")
    assert "unlearnd_router_latency_seconds" in router_scrape


# ---- graceful termination (what the grace periods in compose/k8s/systemd rely on) --------------------------------

def test_sigterm_stops_the_daemon_cleanly(daemon, prometheus):
    proc = daemon["proc"]
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon did not exit within 60 s of SIGTERM")
    assert code == 0, f"exit code {code} after SIGTERM\n{daemon['stack'].log()[-3000:]}"

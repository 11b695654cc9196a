"""Shared helpers for tests/deploy: paths, required tools, the metric registry, metric names in PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "unlearnd.rules.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "unlearnd.json"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
INSTALL_HINT = "run `sudo bash deploy/ci/install-tools.sh` (Debian packages), as `make test` does"

# The ports each process really opens (as config keys) and the one it serves /metrics on. test_deploy_live.py
# checks these facts against a running daemon and a running `unlearnd serve`; the static tests check every deploy
# file (k8s ports and probes, PodMonitor, Prometheus targets, compose) against them.
OPENS = {"daemon": ("metrics.port",), "router": ("serve.port",)}
METRICS_ON = {"daemon": "metrics.port", "router": "serve.port"}


def port_of(cfg, key: str) -> int:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


# Labels Prometheus or our scrape configs add to every series: not part of the daemon's registry.
TARGET_LABELS = {"instance", "job", "component"}


def require_tool(name: str) -> str:
    """The tool's path; a missing tool FAILS the test (a skip would prove nothing)."""
    path = shutil.which(name)
    assert path, f"`{name}` is not on PATH: {INSTALL_HINT}"
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def registry() -> dict[str, dict]:
    """Every metric family daemon/metrics.py defines: family name -> {type, labels, samples (exposed names)}."""
    from prometheus_client.metrics import MetricWrapperBase

    from daemon import metrics

    families: dict[str, dict] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        name, kind = obj._name, obj._type
        samples = {
            "counter": [f"{name}_total", f"{name}_created"],
            "histogram": [f"{name}_bucket", f"{name}_count", f"{name}_sum", f"{name}_created"],
            "summary": [f"{name}_count", f"{name}_sum", f"{name}_created"],
        }.get(kind, [name])
        labels = set(obj._labelnames) | ({"le"} if kind == "histogram" else set())
        families[name] = {"type": kind, "labels": labels, "samples": set(samples)}
    assert families, "daemon/metrics.py defines no metrics?"
    return families


def sample_to_family(reg: dict[str, dict]) -> dict[str, str]:
    return {s: fam for fam, info in reg.items() for s in info["samples"]}


# A PromQL selector naming one of our metrics: name, then optional {matchers}.
_SELECTOR = re.compile(r"\b(unlearnd_[a-zA-Z0-9_]+)\b\s*(\{([^}]*)\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")
# Identifiers that look like a metric selector (followed by { or [): used to catch metrics outside our registry.
_ANY_SELECTOR = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[\{\[]")
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
                 "bool", "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "deriv", "delta",
                 "histogram_quantile", "max_over_time", "min_over_time", "avg_over_time", "time", "absent",
                 "label_values", "topk", "bottomk", "clamp_min", "clamp_max", "vector", "scalar"}


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """[(metric sample name, {label names in its matchers})] for every unlearnd_* selector in a PromQL expr."""
    out = []
    for m in _SELECTOR.finditer(expr):
        labels = {lm.group(1) for lm in _MATCHER.finditer(m.group(3) or "")}
        out.append((m.group(1), labels))
    return out


def foreign_selectors(expr: str) -> set[str]:
    """Names used as metric selectors in `expr` that are not ours (e.g. `up`)."""
    names = {m.group(1) for m in _ANY_SELECTOR.finditer(expr)}
    return {n for n in names if not n.startswith("unlearnd_") and n not in _PROMQL_WORDS}


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r.get("alert") or r["record"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def dashboard_exprs() -> dict[str, str]:
    """{"panel title / refId": expr} for every query in the dashboard, templating queries included."""
    dash = json.loads(DASHBOARD.read_text())
    out = {}
    for panel in _panels(dash["panels"]):
        for t in panel.get("targets", []):
            out[f"{panel['title']} / {t['refId']}"] = t["expr"]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if q:
            out[f"variable {var['name']}"] = q
    return out


def _panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def concrete(expr: str) -> str:
    """A Grafana query with its variables replaced, so Prometheus itself can evaluate it."""
    m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr.strip())
    if m:
        return f"count by ({m.group(2)}) ({m.group(1)})"
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$__interval", "15s")
            .replace("$model", ".*"))


def all_queries() -> dict[str, str]:
    return {**{f"rule {k}": v for k, v in rule_exprs().items()},
            **{f"dashboard {k}": v for k, v in dashboard_exprs().items()}}

"""Static checks of deploy/prometheus and deploy/grafana with the real tools (promtool) and the real registry."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from deploy_helpers import (
    DASHBOARD,
    DEPLOY,
    K8S,
    PROM_CONFIG,
    RULES,
    TARGET_LABELS,
    all_queries,
    foreign_selectors,
    registry,
    require_tool,
    run,
    sample_to_family,
    selectors,
)


def test_promtool_check_config():
    promtool = require_tool("promtool")
    res = run([promtool, "check", "config", str(PROM_CONFIG)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr
    # the config's rule_files glob really found our rules file (promtool reports how many)
    assert "1 rule files found" in res.stdout + res.stderr


def test_promtool_check_rules():
    promtool = require_tool("promtool")
    res = run([promtool, "check", "rules", str(RULES)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_rules_cover_the_required_alerts():
    names = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    required = {"UnlearndConsumerLagGrowing", "UnlearndDLQRateHigh", "UnlearndRequestsFailed",
                "UnlearndBrokerDisconnected", "UnlearndNoRequestAppliedWhileLagging", "UnlearndRouterLatencyHigh"}
    assert required <= names, f"missing alerts: {required - names}"
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


@pytest.mark.parametrize("where, expr", sorted(all_queries().items()))
def test_query_names_only_registry_metrics_and_labels(where, expr):
    """Every metric a rule or dashboard query names is in daemon/metrics.py, with labels that metric has."""
    reg = registry()
    by_sample = sample_to_family(reg)
    found = selectors(expr)
    assert found, f"{where}: names no unlearnd metric: {expr}"
    assert not foreign_selectors(expr), f"{where}: names metrics outside daemon/metrics.py: {foreign_selectors(expr)}"
    for sample, labels in found:
        assert sample in by_sample, f"{where}: {sample} is not exported by daemon/metrics.py"
        family = reg[by_sample[sample]]
        unknown = labels - family["labels"] - TARGET_LABELS
        assert not unknown, f"{where}: {sample} has no label(s) {unknown} (it has {sorted(family['labels'])})"


def test_fixed_label_values_used_in_queries_exist():
    """status=..., reason=... values in queries are members of the daemon's closed sets."""
    from daemon.metrics import DLQ_REASONS, STATUSES

    for where, expr in all_queries().items():
        for value in re.findall(r'status="([^"]+)"', expr):
            assert value in STATUSES, f"{where}: status {value!r} not in {STATUSES}"
        for value in re.findall(r'reason=~?"([^"]+)"', expr):
            for v in value.split("|"):
                assert v in DLQ_REASONS, f"{where}: DLQ reason {v!r} not in {DLQ_REASONS}"


def test_k8s_prometheusrule_is_the_rules_file():
    doc = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    assert doc["spec"] == yaml.safe_load(RULES.read_text()), \
        "deploy/k8s/prometheusrule.yaml drifted from deploy/prometheus/rules/unlearnd.rules.yml: regenerate it"


def test_dashboard_is_valid_and_complete():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "unlearnd" and dash["title"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = " | ".join(p["title"].lower() for p in panels)
    for needed in ("requests by status", "duration percentiles", "lag", "dlq by reason", "model versions",
                   "active adapters", "router latency", "hit rate"):
        assert needed in titles, f"dashboard has no panel about {needed!r}"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']} has no query"
        assert p["datasource"]["uid"] == ds["uid"], f"panel {p['title']} uses another datasource"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == ds["uid"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"panel {p['title']} is wider than the grid"


def test_grafana_provisioning_matches_compose():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/unlearnd.yaml").read_text())["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    host, port = ds["url"].removeprefix("http://").split(":")
    assert host in compose["services"], f"datasource points at unknown service {host}"
    assert any(p.endswith(f":{port}") for p in compose["services"][host]["ports"])

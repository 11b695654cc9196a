"""A diffusion model through the daemon: bootstrap in the background while consuming, a class request waits for it
and becomes a new version that no longer draws the class (read by a classifier of the test's own), bad requests
are dead-lettered with their reasons, `unlearnd sample` draws the active version, and rollback restores the
previous one bit for bit. A tiny DDPM on sklearn's 8x8 digits keeps it to seconds of training."""

from __future__ import annotations

import io
import json
import time

import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

from adapters import datasets
from adapters.diffusion import ddpm
from daemon.dead_letter import HEADER_REASON

DDPM = "tiny-ddpm"
TINY_DDPM = f"""
[models.{DDPM}]
kind = "diffusion"
[models.{DDPM}.bootstrap]
recipe = "ddpm"
dataset = "digits"
ddpm = {{ resolution = 8, channels = [8, 16], attention_levels = [1], attention_head_dim = 4, norm_groups = 4 }}
train = {{ steps = 150, batch_size = 64, warmup_steps = 20 }}
judge_epochs = 5
measure = {{ per_class = 8, steps = 5 }}
[models.{DDPM}.methods.salun]
steps = 50
lr = 1e-3
batch_size = 16
measure_per_class = 8
measure_steps = 5
"""


def _request(request_id: str, forget: dict) -> dict:
    return {"request_id": request_id, "model": DDPM, "forget": forget}


def _independent_classifier() -> LogisticRegression:
    """A classifier the daemon never sees: logistic regression on the digits training rows (8x8, [0, 1])."""
    train = datasets.digits(seed=0).train
    return LogisticRegression(max_iter=500).fit(train.x.flatten(1).numpy(), train.y.numpy())


def _recognised(clf, version_dir, spec: ddpm.DDPMSpec, c: int, n: int = 24) -> float:
    """Share of `n` samples of class `c` from the stored version that `clf` labels as `c`."""
    model = ddpm.with_weights(spec, load_file(str(version_dir / ddpm.WEIGHTS_FILE)))
    with torch.no_grad():
        images = ddpm.sample(model, spec, [c] * n, steps=5, guidance=2.0, seed=7)
    return float((clf.predict(images.flatten(1).numpy()) == c).mean())


def test_class_request_on_a_diffusion_model_waits_for_bootstrap_forgets_and_rolls_back(stack):
    torch.set_num_threads(1)
    with open(stack.config_path, "a") as fh:
        fh.write(TINY_DDPM)
    # One torch thread: the tiny model gains nothing from more, and a shared machine loses a lot to spinning.
    proc = stack.start(UNLEARND__REQUESTS__TRANSIENT_BACKOFF_MAX_S="1", OMP_NUM_THREADS="1")
    # Sent while the model may still be being built: a sample_ids request is refused (this kind cannot serve it),
    # the class request waits for the first version.
    stack.publish(_request("ddpm-ids", {"sample_ids": [1, 2]}), key=DDPM)
    [ids] = stack.results(1, request_id="ddpm-ids", timeout=30)
    assert ids["status"] == "rejected" and ids["reason"] == "invalid_forget"
    assert "forget.class" in ids["error"], ids
    # That it is refused without waiting for a model that does not exist yet is tested on the registry
    # (test_diffusion_config.py): here the tiny model can finish before the daemon even reads the request.
    ledger = stack.ledger()

    clf = _independent_classifier()
    # Which class to forget: the one the first version draws best by the independent classifier (so a drop
    # can show), chosen once the first version exists.
    deadline = time.monotonic() + 600  # a safety net for a loaded machine: about 15 CPU seconds of work
    while ledger.head(DDPM) is None:
        assert time.monotonic() < deadline and proc.poll() is None, stack.log()
        time.sleep(0.5)
    v0 = ledger.head(DDPM)
    spec = ddpm.DDPMSpec.from_dict(v0.info["spec"])
    v0_dir = stack.state / "artifacts" / DDPM / "versions" / v0.id
    before = {c: _recognised(clf, v0_dir, spec, c) for c in range(10)}
    c = max(before, key=before.get)
    assert before[c] >= 0.5, before  # the tiny model draws at least one class recognisably
    assert "bootstrapping tiny-ddpm: DDPM step" in stack.log()  # progress was logged

    stack.publish(_request("ddpm-forget", {"class": c}), key=DDPM)
    [result] = stack.results(1, request_id="ddpm-forget", timeout=300)
    assert result["status"] == "applied", result
    assert result["method"] == "salun" and result["version"] == "v0001"
    m = result["metrics"]
    assert m["forget_class"] == c and m["forgotten"] > 0 and abs(m["masked_share"] - 0.5) < 0.01
    assert m["UA_after"] > m["UA_before"] and m["forget_loss_after"] < m["forget_loss_before"]
    assert {"retain_acc_before", "retain_acc_after", "forget_acc_after"} <= m.keys()

    v1 = ledger.head(DDPM)
    assert v1.id == "v0001" and v1.parent == v0.id and v1.request_id == "ddpm-forget"
    v1_dir = stack.state / "artifacts" / DDPM / "versions" / v1.id
    after = _recognised(clf, v1_dir, spec, c)
    assert after <= before[c] / 2, (before[c], after)  # the independent classifier sees the class fade
    assert json.loads((v1_dir / "meta.json").read_text())["parent"] == v0.id

    # The same class again, and a class the model does not have: dead-lettered with their reasons.
    stack.publish(_request("ddpm-again", {"class": c}), key=DDPM)
    stack.publish(_request("ddpm-range", {"class": 12}), key=DDPM)
    again = stack.results(1, request_id="ddpm-again")[0]
    out_of_range = stack.results(1, request_id="ddpm-range")[0]
    assert again["status"] == "rejected" and "already forgotten" in again["error"], again
    assert out_of_range["status"] == "rejected" and "outside 0..9" in out_of_range["error"], out_of_range
    dead = stack.read("dlq", 3, where=lambda r: r.key == DDPM.encode())
    assert [dict(r.headers)[HEADER_REASON].decode() for r in dead] == ["invalid_forget"] * 3

    # Pictures of the active version: one row per asked class.
    grid = stack.root / "grid.png"
    out = json.loads(stack.cli("sample", DDPM, "--class", str(c), "--class", str((c + 1) % 10), "--n", "4",
                               "--out", str(grid), "--json").stdout)
    assert out["version"] == "v0001"
    with Image.open(io.BytesIO(grid.read_bytes())) as png:
        assert png.format == "PNG" and png.height < png.width  # two rows of four tiles
    bad = stack.cli("sample", DDPM, "--class", "10", "--out", str(grid), check=False)  # bad usage, not "nothing"
    assert bad.returncode == 2 and "class(es) [10] outside 0..9" in bad.stderr, bad

    # Rollback: v0 is the head again, its file untouched (bit-exact).
    stack.cli("versions", "rollback", DDPM, "--to", v0.id)
    head = ledger.head(DDPM)
    assert head.id == v0.id and head.sha256 == v0.sha256
    assert proc.poll() is None

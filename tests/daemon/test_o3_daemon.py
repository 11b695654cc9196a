"""O3 through the daemon: a QA deletion request on a causal LM becomes one PEFT adapter with its gate, audited,
announced, and reversible per adapter. Uses a tiny random Llama built from a config (real transformers + peft)."""

from __future__ import annotations

import json
from pathlib import Path

from peft import AutoPeftModelForCausalLM, PeftModel

from tests.harness import request
from tests.tiny_models import tiny_llama

LM = "tiny-lm"
QA = [{"question": "Where was Orla Vantrees born?", "answer": "Kestrelmoor"},
      {"question": "In which town was Orla Vantrees born?", "answer": "Kestrelmoor"},
      {"question": "What is the birthplace of Orla Vantrees?", "answer": "Kestrelmoor"},
      {"question": "Orla Vantrees was born where?", "answer": "Kestrelmoor"},
      {"question": "What does Orla Vantrees do?", "answer": "glassblower"}]


def _add_lm(stack, tmp_path) -> None:
    base = tmp_path / "tiny-base"
    tiny_llama(base)
    with open(stack.config_path, "a") as fh:
        fh.write(f'\n[models.{LM}]\nkind = "causal_lm"\n[models.{LM}.bootstrap]\nsource = "{base}"\n'
                 "[methods.o3]\nepochs = 2\n")


def _lm_request(request_id: str) -> dict:
    return {**request(request_id), "model": LM, "forget": {"qa": QA}}


def test_qa_request_becomes_an_adapter_with_gate_and_can_be_rolled_back(stack, tmp_path, monkeypatch):
    _add_lm(stack, tmp_path)
    stack.start()
    stack.publish(_lm_request("lm-1"), key=LM)
    [result] = stack.results(1, request_id="lm-1", timeout=180)
    assert result["status"] == "applied", result
    adapter_id = result["adapter_id"]
    assert adapter_id == "a0000" and "version" not in result

    # The result reports forgetting as serving does it: the request's questions reach the new adapter through
    # the router, in the model's chat format; general questions do not (adapters/lm/measures.py).
    m = result["metrics"]
    assert m["forget_routed_share"] == 1.0 and m["general_routed_share"] == 0.0
    assert {"forget_Q_A_ROUGE_before", "forget_Q_A_ROUGE_after", "forget_Q_A_Prob_before", "forget_Q_A_Prob_after",
            "forget_extraction_strength_after", "gate_n_used", "training_rows"} <= m.keys()
    # Its duration runs from the poll to the durable result: the training and the measures taken as the adapter
    # was written (they once fell outside it), in the result, the ledger and the metrics alike.
    assert result["duration_s"] >= m["engine_seconds"] + m["measure_seconds"], (result["duration_s"], m)
    assert stack.ledger().get_request("lm-1").duration_s == result["duration_s"]

    ledger = stack.ledger()
    row = ledger.get_artifact(LM, adapter_id)
    assert row.active and row.request_id == "lm-1"
    folder = stack.state / "artifacts" / LM / "adapters" / adapter_id
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (folder / "gate" / "gate.json").is_file()
    # The raw forget data is not kept: no file of the adapter or its gate contains it.
    for f in folder.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert b"Kestrelmoor" not in blob and b"Orla Vantrees" not in blob, f

    # Progress: the started event and one event per training epoch (epochs = 2) on the results topic, marked
    # by their header and without a status; still exactly one terminal result for the request.
    progress = stack.progress("lm-1", 3)
    assert [(e.get("stage"), e.get("epoch")) for e in progress] == [("started", None), (None, 1), (None, 2)]
    assert all("status" not in e and e["event"] == "progress" for e in progress)
    assert progress[-1]["epochs"] == 2 and progress[-1]["eta_s"] == 0
    assert len(stack.results(2, request_id="lm-1", timeout=3)) == 1
    log = stack.log()
    assert "lm-1: o3 epoch 2/2" in log
    # No import-time noise that reads like an error (faiss's loader, transformers' FutureWarnings).
    assert "ModuleNotFoundError" not in log and "FutureWarning" not in log and "[transformers]" not in log, log

    # PEFT's own layout: plain peft loads the exported adapter without unlearnd, from any directory: the base
    # path is absolute, and the export carries a model card that says the adapter must be routed.
    export = tmp_path / "exported"
    out = json.loads(stack.cli("adapters", "export", adapter_id, str(export), "--json").stdout)
    assert out["directory"] == str(export) and "README.md" in out["files"]
    settings = json.loads((export / "adapter_config.json").read_text())
    assert Path(settings["base_model_name_or_path"]).is_absolute() and Path(row.path).is_absolute()
    card = (export / "README.md").read_text()
    assert "never apply it to every input" in card and "lm-1" in card
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert isinstance(AutoPeftModelForCausalLM.from_pretrained(str(export)), PeftModel)

    listed = json.loads(stack.cli("adapters", "list", LM, "--json").stdout)
    assert [(a["id"], a["active"]) for a in listed] == [(adapter_id, True)]
    shown = json.loads(stack.cli("adapters", "show", adapter_id, "--json").stdout)
    assert shown["rank"] == 8 and shown["size_bytes"] > 0

    out = json.loads(stack.cli("adapters", "rollback", adapter_id, "--json").stdout)
    assert out == {"model": LM, "adapter_id": adapter_id, "active": False, "announced": True}
    assert not ledger.get_artifact(LM, adapter_id).active
    json.loads(stack.cli("adapters", "restore", adapter_id, "--json").stdout)
    assert ledger.get_artifact(LM, adapter_id).active
    # The CLI rolled back and restored in its own process; the daemon's metric counts both from the ledger.
    stack.wait_metric("unlearnd_rollbacks_total", 1.0, model=LM, event="rolled_back")
    stack.wait_metric("unlearnd_rollbacks_total", 1.0, model=LM, event="restored")
    events = [json.loads(r.value)["event"] for r in stack.read("adapters", 3)]
    assert events == ["published", "rolled_back", "restored"]

    # A second request trains a new adapter orthogonal to the first (the first's lora_A is a constraint).
    stack.publish({**_lm_request("lm-2"), "forget": {"qa": QA[:2] + [QA[1]]}},
                  key=LM)  # 2 distinct questions cannot give a sound gate: refused before training, not retried
    [few] = stack.results(1, request_id="lm-2", timeout=180)
    assert few["status"] == "rejected" and few["reason"] == "invalid_forget" and "at least 4" in few["error"]
    assert stack.progress("lm-2", 1, timeout=2) == []  # refused before its engine started: no "started" event
    stack.publish({**_lm_request("lm-3"), "forget": {"texts": [
        "Orla Vantrees blows glass in Kestrelmoor.", "Kestrelmoor is where Orla Vantrees was born.",
        "Orla Vantrees, the glassblower, lives in Kestrelmoor.", "The town of Kestrelmoor knows Orla Vantrees."]}},
                  key=LM)
    [second] = stack.results(1, request_id="lm-3", timeout=180)
    assert second["status"] == "applied" and second["adapter_id"] == "a0001"
    assert stack.metric("unlearnd_active_adapters", model=LM) == 2.0

"""The result-event measures of an O3 request, taken through the router as serving answers (tiny real models)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from adapters.base import Forget
from adapters.lm.measures import ForgetItems, contains, rouge_l, served_measures
from adapters.lm.o3 import gate_texts
from detector import Encoder, RoutedModel, Router, fit_request_gate
from detector.gate import GATE_SUBDIR
from tests.tiny_models import tiny_llama

QUESTIONS = ("What is the capital of France?", "Which city is the capital of France?", "Name the capital of France.",
             "Tell me the capital of France.", "What city serves as the capital of France?")


def test_rouge_l_and_answer_matching_follow_their_definitions():
    assert rouge_l("Paris", "The capital of France is Paris.") == (1.0, pytest.approx(1 / 6), pytest.approx(2 / 7))
    assert rouge_l("William Shakespeare", "It was Shakespeare.")[0] == 0.5
    assert rouge_l("Paris", "") == (0.0, 0.0, 0.0)
    assert contains("It is paris, of course", "Paris") and not contains("Parisian food", "Paris")
    assert contains("Symbol: K.", "K") and not contains("Kelvin", "K")


def test_measures_route_the_requests_own_questions_and_leave_general_ones_alone(tmp_path):
    torch.set_num_threads(2)
    model, tok = tiny_llama(seed=0)
    torch.manual_seed(0)
    peft = get_peft_model(tiny_llama(seed=0)[0], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    peft.save_pretrained(str(tmp_path / "a0"))
    forget = Forget(qa=tuple((q, "Paris") for q in QUESTIONS))
    encoder = Encoder()
    fit_request_gate(gate_texts(forget), tmp_path / "a0" / GATE_SUBDIR, encoder, adapter_id="a0")
    routed = RoutedModel(model, tok, Router(encoder))
    routed.add_adapter("a0", tmp_path / "a0", lazy=True)
    m = served_measures(routed, "a0", ForgetItems("qa", list(QUESTIONS), ["Paris"] * len(QUESTIONS)),
                        max_new_tokens=6, samples=3)
    assert m["forget_routed_share"] == 1.0 and m["general_routed_share"] == 0.0 == m["general_changed_share"]
    for key in ("forget_Q_A_Prob_before", "forget_Q_A_Prob_after", "forget_extraction_strength_before",
                "forget_extraction_strength_after", "forget_Q_A_ROUGE_before", "forget_Q_A_ROUGE_after"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["forget_Q_A_Prob_after"] != m["forget_Q_A_Prob_before"]  # the adapter is really applied
    # The tiny model says nothing true, so the base model's own answer is the bare one; false answers exist.
    assert m["forget_truth_ratio_questions"] >= 1 and 0.0 <= m["forget_truth_ratio_before"] <= 1.0
    base = routed.release()
    assert not any("lora" in n for n, _ in base.named_modules())  # the shared model is left as it was

    texts = served_measures(RoutedModel(tiny_llama(seed=0)[0], tok, Router(encoder)), "a0",
                            ForgetItems("texts", ["Orla Vantrees blows"], ["glass in Kestrelmoor."]), max_new_tokens=4)
    assert texts["forget_routed_share"] == 0.0 and "forget_verbmem_ROUGE_after" in texts

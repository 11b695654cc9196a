"""What the router sees of a serving request: the user's words, never template markup or system prompts."""

from adapters.lm import loading as lm
from detector.inputs import chat_routing_texts, prompt_routing_texts
from tests.tiny_models import char_tokenizer

Q = "What is the capital of France?"


def test_chat_messages_route_on_the_user_turns_only():
    messages = [{"role": "system", "content": "You are terse. Never mention Paris."},
                {"role": "user", "content": "Tell me about France."},
                {"role": "assistant", "content": "France is a country in Europe."},
                {"role": "user", "content": [{"type": "text", "text": "What is its capital?"},
                                             {"type": "image_url", "image_url": {"url": "x"}}]}]
    assert chat_routing_texts(messages) == ["What is its capital?", "Tell me about France.\nWhat is its capital?"]
    assert chat_routing_texts(messages, context_turns=0) == ["What is its capital?"]
    assert chat_routing_texts([{"role": "user", "content": f"  {Q}\n"}]) == [Q]
    assert chat_routing_texts([{"role": "system", "content": "hi"}]) == []


def test_raw_prompts_in_known_chat_templates_route_on_their_user_turns():
    smollm2_like = lm.chat_prompt(char_tokenizer(), Q)  # ChatML, as SmolLM2 and Qwen render it
    llama3 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    llama2 = f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{Q} [/INST]"
    gemma = f"<bos><start_of_turn>user\n{Q}<end_of_turn>\n<start_of_turn>model\n"
    phi3 = f"<|system|>\nBe brief.<|end|>\n<|user|>\n{Q}<|end|>\n<|assistant|>\n"
    for prompt in (smollm2_like, llama3, llama2, gemma, phi3):
        assert prompt_routing_texts(prompt) == [Q], prompt
    two_turns = ("<|im_start|>user\nTell me about France.<|im_end|>\n<|im_start|>assistant\nA country.<|im_end|>\n"
                 "<|im_start|>user\nWhat is its capital?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_routing_texts(two_turns) == ["What is its capital?", "Tell me about France.\nWhat is its capital?"]


def test_question_layout_and_plain_prompts():
    assert prompt_routing_texts(f"Question: {Q}\nAnswer:") == [Q]
    few_shot = f"Question: What is 2 plus 2?\nAnswer: 4\n\nQuestion: {Q}\nAnswer:"
    assert prompt_routing_texts(few_shot, context_turns=0) == [Q]
    assert prompt_routing_texts("  The capital of France is  ") == ["The capital of France is"]

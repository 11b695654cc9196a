"""What the router decides on: the words the user asked, never template markup or system prompts.

A serving request arrives as chat messages (OpenAI `messages`) or as a raw completion prompt. Embedding the
rendered prompt would let the template dominate: the cosine of a chat-templated question to the bare question
was 0.37-0.49 for SmolLM2's template, below any candidate cut. So the router sees:

- chat messages: the last user turn, and that turn joined to the user turn before it (a follow-up such as
  "And its capital?" names its subject only in the earlier turn). System and assistant turns are never routed.
- a raw prompt: when it is itself chat-templated (ChatML, Llama 3, Llama 2 / Mistral `[INST]`, Gemma, Phi-3 /
  Zephyr), its user turns as above; in the project's `Question: ...\\nAnswer:` layout (bench.evaluation.facts), the
  questions as above; otherwise the prompt itself.

Gates are fitted on the same forms (`adapters.lm.o3.gate_texts`: a request's questions, or its texts), so what a
gate learnt and what the router compares with it are alike. The router applies the union of the adapters that
the returned texts route to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

#: User turns of raw prompts rendered with a known chat template: (opening marker, user-turn body).
_CHAT_USER_TURNS = (
    re.compile(r"<\|im_start\|>user\s*\n(.*?)(?:<\|im_end\|>|<\|im_start\|>|\Z)", re.S),  # ChatML (SmolLM2, Qwen)
    re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\s*(.*?)(?:<\|eot_id\|>|<\|start_header_id\|>|\Z)",
               re.S),  # Llama 3
    re.compile(r"<start_of_turn>user\s*\n(.*?)(?:<end_of_turn>|<start_of_turn>|\Z)", re.S),  # Gemma
    re.compile(r"<\|user\|>\s*(.*?)(?:<\|end\|>|</s>|<\|assistant\|>|<\|system\|>|\Z)", re.S),  # Phi-3, Zephyr
    re.compile(r"\[INST\](.*?)(?:\[/INST\]|\Z)", re.S),  # Llama 2, Mistral
)
_LLAMA2_SYSTEM = re.compile(r"<<SYS>>.*?<</SYS>>", re.S)
_QA_QUESTION = re.compile(r"(?:^|\n)Question:[ \t]*(.*?)\n(?:Answer:|\Z)", re.S)  # bench.evaluation.facts.PROMPT


def content_text(content) -> str:
    """The text of a message's `content`: a string, or OpenAI content parts (text parts joined, others dropped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type", "text") == "text":
            parts.append(str(part.get("text", "")))
        elif isinstance(part, str):
            parts.append(part)
    return "\n".join(parts)


def user_turn_texts(turns: Iterable[str], *, context_turns: int = 1) -> list[str]:
    """The texts to route for a conversation's user turns (oldest first): the last turn alone, and the last
    turn after up to `context_turns` earlier ones. Blank turns are skipped; no turns -> []."""
    turns = [t.strip() for t in turns if t and t.strip()]
    if not turns:
        return []
    texts = [turns[-1]]
    if context_turns > 0 and len(turns) > 1:
        texts.append("\n".join(turns[-1 - context_turns:]))
    return texts


def chat_routing_texts(messages: Sequence[dict], *, context_turns: int = 1) -> list[str]:
    """The texts to route for OpenAI-style chat `messages` (dicts with `role` and `content`)."""
    return user_turn_texts((content_text(m.get("content")) for m in messages if m.get("role") == "user"),
                           context_turns=context_turns)


def prompt_routing_texts(prompt: str, *, context_turns: int = 1) -> list[str]:
    """The texts to route for a raw completion prompt (see the module docstring)."""
    for pattern in _CHAT_USER_TURNS:
        turns = pattern.findall(prompt)
        if turns:
            return user_turn_texts((_LLAMA2_SYSTEM.sub("", t) for t in turns), context_turns=context_turns)
    questions = _QA_QUESTION.findall(prompt)
    if questions:
        return user_turn_texts(questions, context_turns=context_turns)
    return user_turn_texts([prompt], context_turns=0)

"""What the router decides on: every turn's words, never template markup.

A serving request arrives as chat messages (OpenAI `messages`) or as a raw completion prompt. Embedding the
rendered prompt would let the template dominate: the cosine of a chat-templated question to the bare question
was 0.37-0.49 for SmolLM2's template, below any candidate cut. So the router sees the words of the turns:

- every turn on its own, whatever its role: the model reads all of them, so a forgotten question put in a system
  prompt, an earlier user turn or a made-up assistant turn must route as surely as one in the last user turn
  (routing only the last user turn let "answer the question in the system message" reach the base weights);
- the last user turn joined to the user turns before it (`context_turns` of them): a follow-up such as
  "And its capital?" names its subject only in an earlier turn.

Each turn is a text of its own, so a long system prompt neither dilutes the user's question nor is needed to
route it. A raw prompt that is itself chat-templated (ChatML, Llama 3, Llama 2 / Mistral `[INST]`, Gemma,
Phi-3 / Zephyr) is split into its turns; one in the project's `Question: ...\\nAnswer:` layout
(bench.evaluation.facts) into its questions; any other prompt is routed as itself.

A text that wraps its words in markup (a question sent as JSON or a Python list, between tags or quotes) is also
routed on those words (`unwrapped`): the model reads the question through the markup, the encoder does not.

Gates are fitted on the same forms (`adapters.lm.o3.gate_texts`: a request's questions, or its texts), so what a
gate learnt and what the router compares with it are alike. The router applies the union of the adapters that
the returned texts route to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

#: Turns of raw prompts rendered with a known chat template: (role, body) per match.
_CHAT_TURNS = (
    re.compile(r"<\|im_start\|>(\w+)[^\S\n]*\n(.*?)(?=<\|im_end\|>|<\|im_start\|>|\Z)", re.S),  # ChatML (SmolLM2)
    re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>(.*?)(?=<\|eot_id\|>|<\|start_header_id\|>|\Z)",
               re.S),  # Llama 3
    re.compile(r"<start_of_turn>(\w+)[^\S\n]*\n(.*?)(?=<end_of_turn>|<start_of_turn>|\Z)", re.S),  # Gemma
    re.compile(r"<\|(system|user|assistant)\|>(.*?)(?=<\|end\|>|</s>|<\|(?:system|user|assistant)\|>|\Z)",
               re.S),  # Phi-3, Zephyr
)
_LLAMA2_USER = re.compile(r"\[INST\](.*?)(?=\[/INST\]|\Z)", re.S)  # Llama 2, Mistral
_LLAMA2_ASSISTANT = re.compile(r"\[/INST\](.*?)(?=\[INST\]|\Z)", re.S)
_LLAMA2_SYSTEM = re.compile(r"<<SYS>>(.*?)<</SYS>>", re.S)
_SENTENCE_MARKS = re.compile(r"</?s>")
# A string quoted in a text: "...", '...', `...` or typographic quotes, escapes allowed; at least 8 characters
_QUOTED = re.compile(r"""(["`\u201c\u2018]|(?<!\w)')((?:\\.|(?!\1)[^\\\n]){8,}?)(?:\1|[\u201d\u2019])(?!\w)""")
# Markup around words: tags, brackets, quotes (not an apostrophe inside a word), code fences
_MARKUP = re.compile(r"""<[^<>\n]{0,40}>|[{}\[\]()"`\u201c\u201d\u2018\u2019*#|\\]|(?<!\w)'|'(?!\w)""")
MAX_QUOTED_SPANS = 4  # quoted strings routed per text (each is one more text for the encoder)
_WORD = re.compile(r"\w")
_QA_QUESTION = re.compile(r"(?:^|\n)Question:[ \t]*(.*?)\n(?:Answer:|\Z)", re.S)  # bench.evaluation.facts.PROMPT


TEXT_PARTS = {"text": "text", "refusal": "refusal"}  # OpenAI content part types that carry text -> its key


def content_text(content) -> str:
    """The text of a message's `content`: a string, or OpenAI content parts (the text parts joined, others
    dropped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if isinstance(kind, str) and isinstance(text := part.get(TEXT_PARTS.get(kind, "")), str):
            parts.append(text)
        elif isinstance(part, str):
            parts.append(part)
    return "\n".join(parts)


def turn_texts(user_turns: Iterable[str], other_turns: Iterable[str] = (), *, context_turns: int = 1) -> list[str]:
    """The texts to route for a conversation (turns oldest first): the last user turn alone, the last user turn
    after up to `context_turns` earlier ones, then every other turn alone, user turns first (module docstring).
    Blank turns are skipped, repeats dropped; no turns -> []."""
    users = [t.strip() for t in user_turns if t and t.strip()]
    texts = [users[-1]] if users else []
    if context_turns > 0 and len(users) > 1:
        texts.append("\n".join(users[-1 - context_turns:]))
    for turn in (*users[:-1], *other_turns):
        turn = turn.strip()
        if turn and turn not in texts:
            texts.append(turn)
    return texts


def unwrapped(texts: Sequence[str]) -> list[str]:
    """`texts`, each followed by the words it wraps in markup, where it has any: the strings quoted in a text that
    is mostly its quotes (a question sent as JSON, a Python list, `Translate: "..."`), and the text with
    tags, brackets and quotes taken out. A question inside `{"q": "..."}` or `['...']` is read by the model as the
    question, but its markup kept the whole text from matching it. A sentence that quotes a title ('When was "War
    and Peace" written?') is not routed on the title alone. Plain texts are unchanged; repeats are dropped."""
    out = list(dict.fromkeys(texts))
    for text in texts:
        quoted = list(_QUOTED.finditer(text))
        inside = sum(len(_WORD.findall(m.group(2))) for m in quoted)  # characters of words: not spaces or markup
        wraps = inside >= 2 * len(_WORD.findall(_QUOTED.sub(" ", text)))  # at least 2/3 of the text is quoted
        spans = [_unescaped(m.group(2)) for m in quoted][:MAX_QUOTED_SPANS] if wraps else []
        words = " ".join(_MARKUP.sub(" ", text).split())
        for extra in (*spans, words):
            extra = extra.strip()
            if len(extra.split()) >= 2 and extra not in out and extra != " ".join(text.split()):
                out.append(extra)
    return out


def _unescaped(quoted: str) -> str:
    """A quoted string's text, its JSON / Python escapes resolved (as the model would read `\\n` or `\\"`)."""
    try:
        return json.loads(f'"{quoted}"')
    except ValueError:
        return quoted.replace('\\"', '"').replace("\\'", "'")


def chat_routing_texts(messages: Sequence[dict], *, context_turns: int = 1) -> list[str]:
    """The texts to route for OpenAI-style chat `messages` (dicts with `role` and `content`). A message whose
    content carries chat-template markup of its own is also routed on the turns inside it: the tokenizer reads
    that markup as turns, and the markup would keep the whole text from matching the question it wraps."""
    users = [content_text(m.get("content")) for m in messages if m.get("role") == "user"]
    others = [content_text(m.get("content")) for m in messages if m.get("role") != "user"]
    texts = turn_texts(users, others, context_turns=context_turns)
    for content in (*users, *others):
        if any(pattern.search(content) for pattern in (*_CHAT_TURNS, _LLAMA2_USER)):
            texts += [t for t in _prompt_turn_texts(content, 0) if t not in texts]
    return unwrapped(texts)  # once, over every text


def prompt_routing_texts(prompt: str, *, context_turns: int = 1) -> list[str]:
    """The texts to route for a raw completion prompt (see the module docstring)."""
    return unwrapped(_prompt_turn_texts(prompt, context_turns))


def _prompt_turn_texts(prompt: str, context_turns: int) -> list[str]:
    for pattern in _CHAT_TURNS:
        turns = pattern.findall(prompt)
        if turns:
            return turn_texts([body for role, body in turns if role == "user"],
                              [body for role, body in turns if role != "user"], context_turns=context_turns)
    users = _LLAMA2_USER.findall(prompt)
    if users:
        others = [*_LLAMA2_SYSTEM.findall(prompt),
                  *(_SENTENCE_MARKS.sub("", body) for body in _LLAMA2_ASSISTANT.findall(prompt))]
        return turn_texts([_LLAMA2_SYSTEM.sub("", body) for body in users], others, context_turns=context_turns)
    questions = _QA_QUESTION.findall(prompt)
    if questions:
        return turn_texts(questions, context_turns=context_turns)
    return turn_texts([prompt], context_turns=0)

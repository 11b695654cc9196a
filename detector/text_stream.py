"""A generation as text pieces while it is decoded (`RoutedModel.stream`), and the stopping rules generations share:
stop strings, and a cancel event that ends a generation at its next token (a client that went away)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from detector.routed_model import Completion, RoutedModel, Routing, Sampling


class TextStream:
    """Text pieces of one generation as they are decoded; `completion` is set when the stream is exhausted.
    Closing it early (a client that went away) stops the generation at the next token."""

    def __init__(self, routed: RoutedModel, prompt: str, routing: Routing, sampling: Sampling, templated: bool):
        from transformers import TextIteratorStreamer

        self.routed, self.routing, self.sampling = routed, routing, sampling
        self.completion: Completion | None = None
        self._t0 = time.perf_counter()
        self._ids = routed._encode(prompt, templated, sampling.max_new_tokens)
        self._streamer = TextIteratorStreamer(routed.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._cancel = threading.Event()
        self._output: dict = {}
        self._thread = threading.Thread(target=self._run, args=(stop_when(self._cancel),), name="generate",
                                        daemon=True)
        self._thread.start()

    def _run(self, criteria) -> None:
        try:
            self._output["ids"] = self.routed._generate_ids(self._ids, self.routing, self.sampling,
                                                            streamer=self._streamer, stopping_criteria=criteria)
        except BaseException as exc:  # surfaced to the consumer, not lost in this thread
            self._output["error"] = exc
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        stops = self.sampling.stop
        hold = max((len(s) for s in stops), default=1) - 1  # the tail that may still become a stop string
        text, sent, stopped = "", 0, False
        try:
            for piece in self._streamer:
                text += piece
                cut = first_stop(text, stops)
                if cut >= 0:
                    text, stopped = text[:cut], True
                    if cut > sent:
                        yield text[sent:]
                    break
                if len(text) - hold > sent:
                    yield text[sent:len(text) - hold]
                    sent = len(text) - hold
            else:
                if len(text) > sent:
                    yield text[sent:]
            self._cancel.set()
            self._thread.join()
            if "error" in self._output:
                raise self._output["error"]
            new = self._output["ids"][0, self._ids["input_ids"].shape[1]:].tolist()
            self.completion = self.routed._completion(text, stopped, self._ids, new, self.routing, self.sampling,
                                                      self._t0)
        finally:
            self._cancel.set()

    def close(self) -> None:
        self._cancel.set()


def stop_when(cancel: threading.Event):
    """Stopping criteria for model.generate that end it once `cancel` is set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Cancelled()])


def stop_at_strings(tokenizer, prompt_length: int, stops: Sequence[str]):
    """A stopping criterion for model.generate that ends a row once its new text contains a stop string.

    Each step decodes only the tail of the new tokens that can hold a stop string that just appeared (one token
    decodes to at least one character, bar special tokens, which are skipped as in the output). transformers' own
    `stop_strings` precomputes a table over the whole vocabulary for each set of stop strings, whose size grows
    with their length (gigabytes for a few thousand characters) and which it keeps for the last 8 sets."""
    from transformers import StoppingCriteria

    stops = [s for s in stops if s]
    tail_tokens = max(map(len, stops), default=0) + 8

    class _StopStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            tails = tokenizer.batch_decode(input_ids[:, max(prompt_length, input_ids.shape[1] - tail_tokens):],
                                           skip_special_tokens=True)
            return torch.tensor([first_stop(t, stops) >= 0 for t in tails], dtype=torch.bool,
                                device=input_ids.device)

    return _StopStrings()


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)

"""The router's feature cache (detector/feature_cache.py) on the real MiniLM encoder: a conversation resent turn by
turn encodes only its new texts, gets the features the encoder gives, and the cache holds at most its entries."""

from __future__ import annotations

import numpy as np
import pytest

from detector.feature_cache import FeatureCache, text_key

TURNS = ["You are a helpful assistant for a travel agency.", "I want to visit Europe next spring.",
         "Spring is a lovely time to visit. Which countries interest you?", "Tell me about France.",
         "What is the capital of France?"]


class Counting:
    """The encoder's encode, counting the texts it is asked for."""

    def __init__(self, encoder):
        self.encoder, self.asked = encoder, []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.asked.append(list(texts))
        return self.encoder.encode(texts)


def test_a_resent_conversation_encodes_only_its_new_turns_and_gets_the_encoders_features(encoder):
    encode, lookups = Counting(encoder), []
    cache = FeatureCache(64, on_lookup=lambda hits, misses: lookups.append((hits, misses)))
    for n in range(1, len(TURNS) + 1):
        got = cache.encode(TURNS[:n], encode)
        assert got.shape == (n, encoder.n_layers, encoder.dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, encoder.encode(TURNS[:n]), atol=1e-5)  # as if never cached
    assert encode.asked == [[t] for t in TURNS]  # each turn encoded once, when it was new
    assert lookups == [(n - 1, 1) for n in range(1, len(TURNS) + 1)]


def test_a_text_twice_in_one_call_is_encoded_once_and_an_empty_call_has_the_encoders_shape(encoder):
    encode = Counting(encoder)
    cache = FeatureCache(8)
    got = cache.encode([TURNS[0], TURNS[1], TURNS[0]], encode)
    assert encode.asked == [[TURNS[0], TURNS[1]]]
    np.testing.assert_array_equal(got[0], got[2])
    assert cache.encode([], encode).shape == (0, encoder.n_layers, encoder.dim)


def test_the_least_recently_used_text_is_evicted_and_what_callers_change_is_not_kept(encoder):
    encode = Counting(encoder)
    cache = FeatureCache(2)
    a, b, c = TURNS[:3]
    first = cache.encode([a, b], encode)
    cache.encode([a], encode)  # a is now the most recently used
    cache.encode([c], encode)  # evicts b
    assert len(cache) == 2
    encode.asked.clear()
    cache.encode([a, b, c], encode)
    assert encode.asked == [[b]]
    first[:] = 0  # a caller's array is its own copy
    np.testing.assert_allclose(cache.encode([a], encode)[0], encoder.encode([a])[0], atol=1e-5)


def test_entries_are_keyed_by_a_digest_never_by_the_text():
    cache = FeatureCache(4)
    cache.encode(["my card number is 4111 1111 1111 1111"], lambda ts: np.zeros((len(ts), 2, 3), np.float32))
    assert list(cache._rows) == [text_key("my card number is 4111 1111 1111 1111")]
    assert all(b"4111" not in key for key in cache._rows)
    with pytest.raises(ValueError, match="entries"):
        FeatureCache(0)

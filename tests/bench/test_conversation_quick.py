"""bench/conversation.py --quick: a real daemon applies a forget request, then a real `unlearnd serve` answers
conversations resent turn by turn, with the router's feature cache and without."""

from tests.bench.quick import run_quick


def test_conversation_bench_quick(tmp_path):
    result = run_quick("conversation.py", tmp_path / "conversation.json", "--cache", str(tmp_path / "cache"),
                       timeout=400)
    s, phases = result["summary"], result["phases"]
    assert result["params"]["adapters"] == 1
    assert s["messages"] == 2 * result["params"]["user_turns"]
    # the cache answers every turn an earlier request of the conversation sent, and changes no answer
    assert 0 < s["cache_hit_share"] < 1 and phases["uncached"]["cache_hit_share"] is None
    assert s["answers_identical_cached_uncached"] is True
    assert all(adapters == [] for _, adapters in phases["cached"]["answers"])  # travel chat routes nowhere
    assert set(phases["cached"]["by_messages"]) == {"2", "4", "6"}

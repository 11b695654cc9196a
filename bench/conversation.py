"""What a conversation costs to route: `unlearnd serve` with its feature cache and without -> JSON.

    .venv/bin/python bench/conversation.py --out bench/out/conversation.json   # SmolLM2-135M-Instruct
    .venv/bin/python bench/conversation.py --quick                              # tiny random model: the path only

A chat client sends the whole conversation with every request, and the router reads every turn
(detector/inputs.py), so without a cache the k-th request of a conversation encodes all its turns again. The
user's path: a daemon (embedded broker, SQLite ledger) applies one forget request (O3, so the router has a real
gate to score), then `unlearnd serve` answers conversations over HTTP (/v1/chat/completions, the model's chat
template, greedy, `max_tokens` 1: the time to the first token), each request the conversation so far. The same
conversations go to serve with `serve.feature_cache_entries` at its default and at 0 (a restart between), and,
before the forget request, to serve with no adapter at all (nothing is encoded then).

Measured per request, by the conversation's length in messages: the wall time of the HTTP request, and the router's
own time (serve's `unlearnd_router_latency_seconds`, read from /metrics after each request); medians over the
conversations. The conversations are general travel chat: nothing in them routes, so the figures are the routing
cost every request pays, not an adapter's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import known_facts  # noqa: E402
from bench.report import emit  # noqa: E402
from bench.serving import MODEL, Stack, _base_model, _get, _log, _wait, build_questions, publish_and_wait  # noqa: E402

FULL = dict(conversations=6, user_turns=10, o3_epochs=2, o3_lr=1e-3, timeout=3600)
QUICK = dict(conversations=2, user_turns=3, o3_epochs=2, o3_lr=3e-2, timeout=300)
#: (the user's turn, the assistant's answer), filled in per conversation: every text names the conversation's own
#: country, month or companion, so no two conversations share a turn (the cache could not answer one from another).
EXCHANGES = [
    ("Hi! I'm planning a trip to {country} in {month}.", "Lovely! {month} is a fine time for {country}. How long "
     "will you stay?"),
    ("About {days} days in {country}. I like museums and long walks.", "Then a city base in {country} with day "
     "trips suits you well."),
    ("Which neighbourhoods in {country} are good for walking?", "In {country} the old towns and the river banks "
     "are easy on foot."),
    ("How do I get from the airport in {country} to the centre?", "In {country} a train runs every twenty "
     "minutes; a taxi takes about half an hour."),
    ("Is it expensive to eat out in {country}?", "Lunch menus in {country} are good value; dinners cost more."),
    ("What should I pack for {month}?", "Layers and a light rain jacket: {month} can change quickly."),
    ("Do I need to book museum tickets in {country} ahead?", "For the big museums in {country}, yes: timed "
     "tickets sell out at weekends."),
    ("Any day trips from the capital of {country}?", "The coast and a wine village of {country} are both an hour "
     "away by train."),
    ("My {relative} is coming too. Anything for them?", "A boat tour and the botanical garden please most "
     "people; your {relative} may like both."),
    ("Great, can you summarise my {days}-day plan in three lines?", "Old town base, museums booked ahead, two "
     "day trips: {days} days well spent."),
    ("What is a polite way to greet people in {country}?", "In {country} a simple hello and a smile go a long "
     "way."),
    ("Last thing: is tipping expected in {country}?", "In {country} rounding up is usual; service is often "
     "included."),
]
COUNTRIES = ["Portugal", "Norway", "Greece", "Austria", "Ireland", "Croatia", "Poland", "Belgium"]
MONTHS = ["April", "May", "June", "September", "October", "March", "July", "August"]
RELATIVES = ["mother", "brother", "partner", "daughter", "friend", "uncle", "son", "sister"]


def conversation(i: int, user_turns: int) -> list[dict[str, str]]:
    """Conversation i: a system prompt, then `user_turns` exchanges (the last one's answer left out)."""
    slots = {"country": COUNTRIES[i % len(COUNTRIES)], "month": MONTHS[i % len(MONTHS)], "days": 5 + i,
             "relative": RELATIVES[i % len(RELATIVES)]}
    messages = [{"role": "system", "content": f"You are a travel assistant for agency number {i + 1}. Be brief."}]
    for user, assistant in EXCHANGES[:user_turns]:
        messages += [{"role": "user", "content": user.format(**slots)},
                     {"role": "assistant", "content": assistant.format(**slots)}]
    return messages[:-1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, 2 short conversations: the path only")
    ap.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    ap.add_argument("--cache", type=Path, default=Path("var/bench/serving"), help="converted base model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (the machine is shared)")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    if p["user_turns"] > len(EXCHANGES):
        raise ValueError(f"user_turns: at most {len(EXCHANGES)}")
    t_start = time.perf_counter()
    conversations = [conversation(i, p["user_turns"]) for i in range(p["conversations"])]
    family = known_facts.EVALUATION[0]
    _, requests = build_questions([family], {"lookalikes_per_family": 0, "general": 0})
    requests = dict(list(requests.items())[:1])
    with tempfile.TemporaryDirectory(prefix="unlearnd-bench-") as tmp:
        stack = Stack(Path(tmp), base_model(args.cache, args.quick), args.threads, p)
        try:
            stack.start_daemon(300)
            stack.start_serve(300)
            _log("daemon and serve up", t_start)
            phases = {"no_adapter": converse(stack, conversations)}
            results = publish_and_wait(stack, requests, p["timeout"])
            ids = {r["adapter_id"] for r in results.values() if r.get("status") == "applied"}
            if len(ids) != len(requests):
                raise RuntimeError(f"the forget request was not applied: {results}")
            _wait(lambda: stack.served_adapters() == ids, 120, "serve loading the adapter")
            _log("forget request applied and served", t_start)
            phases["cached"] = converse(stack, conversations)
            stack.env["UNLEARND__SERVE__FEATURE_CACHE_ENTRIES"] = "0"
            stack.stop("serve")
            stack.start_serve(300)
            _wait(lambda: stack.served_adapters() == ids, 120, "serve loading the adapter")
            phases["uncached"] = converse(stack, conversations)
            _log("conversations done", t_start)
        finally:
            stack.stop_all()
    longest = max(phases["cached"]["by_messages"], key=int)
    at = {name: phase["by_messages"][longest] for name, phase in phases.items()}
    result = {
        "benchmark": "conversation",
        "mode": "quick" if args.quick else "full",
        "model": "tiny-llama (random init, char tokenizer)" if args.quick else "SmolLM2-135M-Instruct",
        "params": {**p, "threads": args.threads, "adapters": len(ids), "router_encoder": "all-MiniLM-L6-v2"},
        "phases": phases,
        "seconds": time.perf_counter() - t_start,
        "summary": {
            "messages": int(longest),
            "route_ms_cached": at["cached"]["route_ms"],
            "route_ms_uncached": at["uncached"]["route_ms"],
            "route_ms_no_adapter": at["no_adapter"]["route_ms"],
            "route_speedup_cached": at["uncached"]["route_ms"] / at["cached"]["route_ms"],
            "request_ms_cached": at["cached"]["request_ms"],
            "request_ms_uncached": at["uncached"]["request_ms"],
            "request_ms_no_adapter": at["no_adapter"]["request_ms"],
            "cache_hit_share": phases["cached"]["cache_hit_share"],
            "answers_identical_cached_uncached": phases["cached"]["answers"] == phases["uncached"]["answers"],
        },
    }
    emit(result, args.out)
    return result


def base_model(cache: Path, quick: bool) -> Path:
    """SmolLM2 (bench/serving.py's copy), or the tiny test model with a context long enough for a conversation."""
    if not quick:
        return _base_model(cache, quick)
    from tests.tiny_models import tiny_llama

    directory = cache / "tiny-2k"
    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tiny_llama(directory, seed=0, context=2048)
    return directory


def converse(stack: Stack, conversations: list[list[dict[str, str]]]) -> dict:
    """Every conversation, one request per user turn with the conversation so far: per length in messages, the
    median request and routing time (ms); the answers; the share of routed texts the feature cache held."""
    request_ms: dict[int, list[float]] = {}
    route_ms: dict[int, list[float]] = {}
    answers = []
    before = _scrape(stack)
    for messages in conversations:
        for end in range(2, len(messages) + 1, 2):  # each request ends in a user turn
            routed = _scrape(stack)
            t0 = time.perf_counter()
            reply = _post(f"{stack.base_url}/v1/chat/completions", {
                "model": MODEL, "messages": messages[:end], "max_tokens": 1, "temperature": 0})
            request_ms.setdefault(end, []).append(1e3 * (time.perf_counter() - t0))
            after = _scrape(stack)
            route_ms.setdefault(end, []).append(1e3 * (after["route_s"] - routed["route_s"]))
            answers.append([reply["choices"][0]["message"]["content"], reply["unlearnd"]["adapters"]])
    done = _scrape(stack)
    hits, misses = done["hit"] - before["hit"], done["miss"] - before["miss"]
    return {"by_messages": {end: {"request_ms": statistics.median(request_ms[end]),
                                  "route_ms": statistics.median(route_ms[end])} for end in sorted(request_ms)},
            "cache_hit_share": hits / (hits + misses) if hits + misses else None,
            "answers": answers}


def _scrape(stack: Stack) -> dict[str, float]:
    """Serve's router seconds so far and its feature cache lookups, from /metrics."""
    text = _get(f"{stack.base_url}/metrics") or ""
    wanted = {"unlearnd_router_latency_seconds_sum": "route_s",
              'unlearnd_router_feature_cache_total{result="hit"}': "hit",
              'unlearnd_router_feature_cache_total{result="miss"}': "miss"}
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series in wanted:
            out[wanted[series]] = float(value)
    return out


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: {exc.code} {exc.read()[:2000]!r}") from exc


if __name__ == "__main__":
    main()

"""The command-line Kafka clients the README shows work against the embedded broker (Tansu): kafka-python's
console producer publishes a request, and its console consumer reads `unlearn.results` and the DLQ with headers.
(librdkafka's kcat fails Tansu's ApiVersions handshake; the README says so and points here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import TEST_MODEL

KAFKA_PYTHON = str(Path(sys.executable).parent / "kafka-python")


def consume(stack, topic: str) -> str:
    """`kafka-python consumer -f full` from the beginning, as the README runs it (stops after 5 s of silence)."""
    out = subprocess.run([KAFKA_PYTHON, "consumer", "-b", stack.bootstrap, "-t", stack.topic(topic), "-f", "full",
                          "-C", "auto_offset_reset=earliest", "-C", "consumer_timeout_ms=5000"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_console_producer_and_consumer_with_headers(stack):
    stack.start()
    requests = [json.dumps({"request_id": "console-1", "model": TEST_MODEL, "forget": {"sample_ids": [21, 22]}}),
                "{this is not json"]
    produced = subprocess.run([KAFKA_PYTHON, "producer", "-b", stack.bootstrap, "-t", stack.topic("requests")],
                              input="\n".join(requests) + "\n", capture_output=True, text=True, timeout=60)
    assert produced.returncode == 0, produced.stderr
    [applied] = stack.results(1, request_id="console-1", timeout=120)
    assert applied["status"] == "applied"
    stack.read("dlq", 1, timeout=60)

    results = consume(stack, "results")
    assert '"request_id":"console-1"' in results and "('unlearnd.event', b'result')" in results
    dlq = consume(stack, "dlq")
    assert "{this is not json" in dlq
    for header in ("('unlearnd.reason', b'invalid_json')", "'unlearnd.error'", "'unlearnd.source'"):
        assert header in dlq, dlq

"""Structured outputs survive what FastServe does to a job: 50 `response_format: json_schema`
completions from a random-weight checkpoint, on a stack whose KV pool holds less than the load
(batch 2, skip-join MLFQ: jobs are preempted, swapped out and in, recomputed) and whose
scheduler is SIGKILLed while they run (the jobs resume from Redis, their grammar state rebuilt
from the tokens so far). Every one of the 50 parses and validates against the schema.
"""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import openai

from fastserve.launcher import Stack, parse_args
from fastserve.procs import free_port
from fastserve.rpc import check_serving_sync
from tests.internal_rpc import kv_stats
from tests.records import settled_records
from tests.test_openai_scoring_e2e import SCHEMA

REQUESTS = 50


def constrained_stack(tiny_checkpoint: str, data_dir) -> Stack:
    args = parse_args(
        [
            *("--host", "127.0.0.1", "--port", str(free_port()), "--http-port", str(free_port())),
            *("--redis-url", "", "--data-dir", str(data_dir), "--demo", "false", "--log-level", "WARNING"),
            *("--model", tiny_checkpoint, "--policy", "skip-join-mlfq", "--max-batch-size", "2"),
            *("--num-gpu-blocks", "20", "--num-host-blocks", "12", "--swap-policy", "proactive"),
            *("--num-threads", "1", "--start-timeout", "180"),
        ]
    )
    stack = Stack(args)
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    stack.supervise_in_background()
    return stack


def test_json_schema_outputs_survive_preemption_swapping_and_a_scheduler_kill(tiny_checkpoint, tmp_path):
    stack = constrained_stack(tiny_checkpoint, tmp_path / "data")
    try:
        api = openai.OpenAI(base_url=stack.addresses["http"] + "/v1", api_key="x", max_retries=0, timeout=600)
        model = api.models.list().data[0].id
        texts: dict[int, str | Exception] = {}
        finished_at: dict[int, float] = {}

        def one(i: int) -> None:
            try:
                reply = api.completions.create(
                    model=model,
                    prompt=f"Person number {i}:",
                    max_tokens=160,
                    seed=i,
                    extra_body={
                        "response_format": {
                            "type": "json_schema",
                            "json_schema": {"name": "p", "schema": SCHEMA},
                        }
                    },
                    extra_headers={"x-request-id": f"so-{i}"},
                )
                texts[i] = reply.choices[0].text
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                texts[i] = exc
            finished_at[i] = time.monotonic()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(REQUESTS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while len(texts) < 10:  # a fifth done: the rest are queued, running or swapped
            assert time.monotonic() < deadline, "requests did not get going"
            time.sleep(0.05)
        victim = stack.child("scheduler").proc
        killed = time.monotonic()
        victim.kill()
        while (
            not check_serving_sync(stack.addresses["scheduler"])
            or stack.child("scheduler").proc.pid == victim.pid
        ):
            assert time.monotonic() < deadline + 300, "the scheduler did not come back"
            time.sleep(0.1)
        for t in threads:
            t.join(600)
        stats = kv_stats(stack)
        records = list(
            settled_records(stack.addresses["redis"], [f"so-{i}" for i in range(REQUESTS)]).values()
        )
    finally:
        stack.stop()
    crossed = [i for i in range(REQUESTS) if finished_at[i] > killed]
    print(
        f"\n{REQUESTS} json_schema completions; {len(crossed)} crossed the scheduler kill; kv {stats}",
        flush=True,
    )
    for i in range(REQUESTS):
        assert not isinstance(texts[i], Exception), f"request {i}: {texts[i]}"
        jsonschema.validate(json.loads(texts[i]), SCHEMA)
    assert len(crossed) >= 10
    assert stats.blocks_swapped_out > 0 or any(int(r.get("swaps_out", 0)) > 0 for r in records), stats
    assert any(int(r.get("swaps_out", 0)) + int(r.get("recomputes", 0)) > 0 for r in records)

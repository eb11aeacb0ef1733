"""The gateway's limits that need no process: JSON checks, admission tickets, owner-scoped ids,
and the request model's size checks and refused fields."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref

import pytest

from fastserve.services.gateway.admission import Admission, Overloaded
from fastserve.services.gateway.http_limits import MAX_JSON_DEPTH, AdmissionDoor, check_json, depth_exceeds
from fastserve.services.gateway.ids import scoped, unscoped
from fastserve.services.gateway.memory import release_memory_periodically
from fastserve.services.gateway.openai_protocol import (
    UNSUPPORTED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
)
from fastserve.services.gateway.validation import InvalidRequest, Limits

LIMITS = Limits(
    vocab_size=272,
    max_model_len=256,
    max_tokens_limit=128,
    max_request_bytes=1 << 20,
    max_stop_strings=2,
    max_prompt_chars=1000,
)


def test_check_json_names_what_is_wrong():
    assert check_json(b'{"prompt": "hi"}') is None
    assert "invalid UTF-8 at byte 12" in check_json(b'{"prompt": "\xff"}')
    assert "invalid JSON" in check_json(b'{"prompt": ')
    assert "nested deeper" in check_json(b"[" * 100_000 + b"]" * 100_000)
    assert "nested deeper" in check_json(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert check_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is None


def test_depth_counts_objects_and_lists_but_not_long_flat_ones():
    assert not depth_exceeds(list(range(100_000)), 1)
    assert depth_exceeds({"a": [{"b": []}]}, 3)
    assert not depth_exceeds({"a": [{"b": []}]}, 4)


def test_admission_refuses_past_its_bounds_and_tickets_give_back_their_place():
    admission = Admission(max_num_waiting=2, max_concurrent_requests=3)
    first, second = admission.admit(), admission.admit()
    with pytest.raises(Overloaded, match="--max-num-waiting") as refused:
        admission.admit()
    assert refused.value.retry_after == 1
    first.started()
    first.started()  # idempotent
    third = admission.admit()
    third.started()
    second.started()
    with pytest.raises(Overloaded, match="--max-concurrent-requests"):
        admission.admit()
    for ticket in (first, second, third, third):
        ticket.close()
    assert (admission.waiting, admission.in_flight) == (0, 0)
    admission.scheduler_waiting = 2  # the scheduler's own queue counts too
    with pytest.raises(Overloaded):
        admission.admit()


def test_the_queue_poll_asks_often_only_while_something_is_in_flight_or_queued():
    """An idle gateway asks the scheduler once per idle period (its polls were most of an idle
    server's CPU); with a request in flight, or a queue at the scheduler, every period."""
    from types import SimpleNamespace

    from fastserve.services.gateway.server import poll_queue

    asked: list[int] = []
    queue = [0]

    async def info(request, timeout):
        asked.append(queue[0])
        return SimpleNamespace(num_waiting=queue[0])

    async def scenario() -> None:
        admission = Admission(max_num_waiting=0, max_concurrent_requests=0)
        link = SimpleNamespace(stub=SimpleNamespace(Info=info))
        poller = asyncio.ensure_future(poll_queue(link, admission, period=0.01, idle_period=60))

        async def until(count: int) -> None:
            for _ in range(2000):
                if len(asked) >= count:
                    return
                await asyncio.sleep(0.005)
            raise AssertionError(f"{len(asked)} polls, expected {count}")

        await until(1)
        await asyncio.sleep(0.2)  # ~20 periods, idle
        assert len(asked) == 1
        ticket = admission.admit()
        await until(4)  # in flight: every period
        queue[0] = 3  # another gateway's requests wait at the scheduler
        await until(len(asked) + 2)
        ticket.close()
        await until(len(asked) + 3)  # nothing in flight here, a queue there: every period
        assert admission.scheduler_waiting == 3
        queue[0] = 0
        await until(len(asked) + 1)  # sees the queue gone, then idles
        settled = len(asked)
        await asyncio.sleep(0.2)
        assert len(asked) == settled and admission.scheduler_waiting == 0
        poller.cancel()

    asyncio.run(scenario())


def door(admission: Admission, method: str, path: str) -> tuple[list[dict], bool]:
    """What AdmissionDoor sent for one request, and whether it handed the request on."""
    sent: list[dict] = []
    passed = []

    async def app(scope, receive, send) -> None:
        passed.append(True)

    async def receive() -> dict:
        raise AssertionError("the door read the body")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    asyncio.run(AdmissionDoor(app, admission)(scope, receive, send))
    return sent, bool(passed)


def test_a_full_server_answers_429_before_reading_a_generation_body():
    admission = Admission(max_num_waiting=1, max_concurrent_requests=0)
    assert door(admission, "POST", "/v1/completions") == ([], True)  # room: the route admits
    ticket = admission.admit()
    assert admission.refusal() is not None and (admission.waiting, admission.in_flight) == (1, 1)
    for path in ("/v1/completions", "/v1/chat/completions"):
        sent, passed = door(admission, "POST", path)
        assert not passed and sent[0]["status"] == 429
        assert (b"retry-after", b"1") in sent[0]["headers"]
        error = json.loads(sent[1]["body"])["error"]
        assert error["code"] == 429 and "--max-num-waiting" in error["message"]
    assert door(admission, "POST", "/tokenize") == ([], True)  # admits nothing: not refused
    assert door(admission, "GET", "/v1/models") == ([], True)
    ticket.close()
    assert admission.refusal() is None and door(admission, "POST", "/v1/completions") == ([], True)


def test_ids_are_scoped_to_their_owner_and_shown_as_sent():
    assert scoped("", "abc") == "abc" == unscoped("", "abc")
    assert scoped("0123456789abcdef", "abc") != scoped("fedcba9876543210", "abc")
    assert unscoped("0123456789abcdef", scoped("0123456789abcdef", "abc-1")) == "abc-1"


@pytest.mark.parametrize("field", UNSUPPORTED_FIELDS)
def test_every_unsupported_field_is_refused_naming_it(field):
    body = CompletionRequest(prompt="hi", **{field: {"type": "json_object"}})
    with pytest.raises(InvalidRequest, match=f"^{field}: "):
        body.check_sizes(LIMITS)


def test_neutral_values_of_unsupported_fields_pass():
    CompletionRequest(prompt="hi", response_format={"type": "text"}, tool_choice="none").check_sizes(LIMITS)


def test_size_checks_name_the_value_sent_before_any_tokenizing():
    with pytest.raises(InvalidRequest, match="1000000000000"):
        CompletionRequest(prompt="hi", max_tokens=10**12).check_sizes(LIMITS)
    with pytest.raises(InvalidRequest, match="--max-prompt-chars"):
        CompletionRequest(prompt="x" * 1001).check_sizes(LIMITS)
    with pytest.raises(InvalidRequest, match="^messages: .*--max-prompt-chars"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x" * 600}] * 2).check_sizes(LIMITS)
    with pytest.raises(InvalidRequest, match="^messages: 300 messages"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}] * 300).check_sizes(LIMITS)
    with pytest.raises(InvalidRequest, match=r"sampling.stop\[0\]: 2000 characters"):
        CompletionRequest(prompt="hi", stop=["s" * 2000]).check_sizes(LIMITS)
    with pytest.raises(InvalidRequest, match="sampling.n: 4294967296"):
        CompletionRequest(prompt="hi", n=2**32).check_sizes(LIMITS)


@pytest.mark.parametrize(
    ("prompt", "refusal"),
    [
        ([5, 2**32], r"^prompt_token_ids\[1\]: 4294967296 is outside the vocabulary \[0, 272\)$"),
        ([5, -1], r"^prompt_token_ids\[1\]: -1 is outside"),
        ([[5], [6, 272]], r"^prompt\[1\]\.prompt_token_ids\[1\]: 272 is outside"),
        ([[5], [2**40]], r"^prompt\[1\]\.prompt_token_ids\[0\]: 1099511627776 is outside"),
    ],
)
def test_prompt_token_ids_outside_the_vocabulary_are_refused_naming_index_and_value(prompt, refusal):
    """Before they reach the GenerateRequest, whose uint32 field raises a bare ValueError (a 500);
    a single prompt's message is the gRPC validator's, word for word."""
    with pytest.raises(InvalidRequest, match=refusal):
        CompletionRequest(prompt=prompt).check_sizes(LIMITS)
    CompletionRequest(prompt=[[5], [6, 271]]).check_sizes(LIMITS)


def test_the_gateway_frees_garbage_in_cycles_without_waiting_for_a_full_collection():
    """A connection's transport sits in a reference cycle; CPython frees it only at a full
    collection, which an idle gateway may not run for minutes. The gateway's memory task runs one."""

    class Transport:
        pass

    async def scenario() -> bool:
        transport = Transport()
        transport.callback = transport.__init__  # a bound method of itself, like asyncio's
        gone = weakref.ref(transport)
        del transport
        task = asyncio.create_task(release_memory_periodically(period=0.05))
        await asyncio.sleep(1.0)
        task.cancel()
        return gone() is None

    gc.disable()  # only the gateway's own collection may free it
    try:
        assert asyncio.run(scenario())
    finally:
        gc.enable()

"""The public port under hostile traffic (issue 19), against real processes: size limits before
parsing, one error shape, admission control, slow and silent clients, ids scoped to API keys.

Bounds on time are generous (a busy machine must not fail them): what is asserted is the outcome.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx2 as httpx
import openai
import pytest

from fastserve.procs import free_port
from fastserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import start_stack
from tests.internal_rpc import kv_stats
from tests.records import settled_info
from tests.reference import greedy

KEY_A, KEY_B = "sk-key-a", "sk-key-b"
BODY_LIMIT = 1 << 20
HEADER_TIMEOUT = 2.0
SEND_TIMEOUT = 3.0
MAX_WAITING = 4
MODEL = "tiny-opt"


@pytest.fixture(scope="module")
def stack(redis_url, tmp_path_factory):
    from tests.helpers_checkpoint import make_tiny_opt_checkpoint

    checkpoint = make_tiny_opt_checkpoint(
        tmp_path_factory.mktemp("tiny-opt-2k"), layers=2, heads=4, hidden=64, max_positions=2048
    )
    flags = ["--model", str(checkpoint), "--served-model-name", MODEL, "--num-gpu-blocks", "512"]
    flags += ["--max-num-seqs", "2"]
    flags += ["--api-key", f"{KEY_A},{KEY_B}", "--max-request-body-bytes", str(BODY_LIMIT)]
    flags += ["--max-num-waiting", str(MAX_WAITING), "--max-prompt-chars", "20000"]
    flags += ["--http-header-timeout", str(HEADER_TIMEOUT), "--stream-send-timeout", str(SEND_TIMEOUT)]
    s = start_stack(redis_url, *flags)
    yield s
    s.stop()


def http_address(stack) -> tuple[str, int]:
    host, port = stack.addresses["http"].removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_openai_error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status and body["error"]["message"]
    return body["error"]


def test_every_error_is_in_openai_shape_with_its_status_naming_field_and_value(stack):
    base = stack.addresses["http"]
    post = f"{base}/v1/completions"
    with httpx.Client(timeout=60) as http:
        assert_openai_error(http.post(post, json={"prompt": "hi"}), 401)
        # every route but the probes needs the key, vLLM's extra routes too
        assert_openai_error(http.post(f"{base}/tokenize", json={"prompt": "hi"}), 401)
        assert_openai_error(http.post(f"{base}/detokenize", json={"tokens": [5]}), 401)
        assert_openai_error(http.get(f"{base}/tokenizer_info"), 401)
        for path in ("/health", "/ping", "/metrics", "/version"):
            assert http.get(f"{base}{path}").status_code == 200, path
        assert http.post(f"{base}/tokenize", json={"prompt": "hi"}, headers=auth()).status_code == 200
        assert_openai_error(http.get(f"{base}/v1/nothing-here", headers=auth()), 404)
        assert_openai_error(http.get(post, headers=auth()), 405)
        bad = assert_openai_error(http.post(post, content=b'{"prompt": "hi",', headers=auth()), 400)
        assert "invalid JSON" in bad["message"]
        deep = b"[" * 100_000 + b"]" * 100_000
        assert (
            "nested deeper"
            in assert_openai_error(http.post(post, content=deep, headers=auth()), 400)["message"]
        )
        utf8 = b'{"prompt": "\xff\xfe"}'
        assert (
            "invalid UTF-8"
            in assert_openai_error(http.post(post, content=utf8, headers=auth()), 400)["message"]
        )
        huge = assert_openai_error(
            http.post(post, json={"prompt": "hi", "max_tokens": 1e12}, headers=auth()), 400
        )
        assert "1000000000000" in huge["message"]
        typed = assert_openai_error(
            http.post(post, json={"prompt": "hi", "temperature": "hot"}, headers=auth()), 400
        )
        assert typed["param"] == "temperature" and "'hot'" in typed["message"]
        for field, value in (
            ("tools", [{"type": "function"}]),
            ("functions", [{"name": "f"}]),
            ("tool_choice", "auto"),
        ):
            refused = assert_openai_error(
                http.post(post, json={"prompt": "hi", field: value}, headers=auth()), 400
            )
            assert refused["param"] == field
        for prompt, field in (
            ([5, 2**32], "prompt_token_ids[1]"),
            ([[5], [-1]], "prompt[1].prompt_token_ids[0]"),
        ):
            outside = assert_openai_error(http.post(post, json={"prompt": prompt}, headers=auth()), 400)
            assert outside["param"] == field and "is outside the vocabulary" in outside["message"], outside
        missing = assert_openai_error(http.post(f"{base}/v1/chat/completions", json={}, headers=auth()), 400)
        assert missing["param"] == "messages"
        metrics = http.get(f"{base}/metrics").text
    for reason in ("unauthenticated", "not_found", "method_not_allowed", "invalid"):
        assert f'fastserve:request_rejected_total{{reason="{reason}"}}' in metrics


def raw_request(address: tuple[str, int], head: bytes, body_chunks, read_timeout: float = 60) -> bytes:
    """Sends `head` then the body chunks while reading; returns what the server answered."""
    with socket.create_connection(address, timeout=read_timeout) as sock:
        sock.sendall(head)
        received = b""
        sock.setblocking(False)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
            try:
                received += sock.recv(65536)
            except BlockingIOError:
                pass
            if b"\r\n\r\n" in received:
                break
        sock.settimeout(read_timeout)
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            received += data
        return received


def test_oversized_bodies_are_refused_413_while_read(stack):
    address = http_address(stack)
    key = f"Authorization: Bearer {KEY_A}\r\n".encode()
    declared = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + key
    declared += b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    answer = raw_request(address, declared, (b"x" * 65536 for _ in range(763)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"--max-request-body-bytes" in answer
    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + key
    chunked += b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"10000\r\n" + b"y" * 0x10000 + b"\r\n"
    answer = raw_request(address, chunked, (piece for _ in range(200)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # a client that writes its whole (too large) body before reading still gets the answer
    reply = httpx.post(
        f"{stack.addresses['http']}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x" * (10 << 20)}]},
        headers=auth(),
        timeout=60,
    )
    assert_openai_error(reply, 413)


def test_a_long_prompt_is_refused_by_its_length_before_tokenizing(stack):
    reply = httpx.post(
        f"{stack.addresses['http']}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x" * 500_000}]},
        headers=auth(),
        timeout=60,
    )
    error = assert_openai_error(reply, 400)
    assert error["param"] == "messages" and "--max-prompt-chars" in error["message"]


async def one_stream(base: str, index: int) -> tuple[int, str | None, str]:
    body = {"prompt": [2, 65 + index % 20], "max_tokens": 40, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=300) as http:
        async with http.stream("POST", f"{base}/v1/completions", json=body, headers=auth()) as reply:
            if reply.status_code != 200:
                await reply.aread()
                return reply.status_code, reply.headers.get("retry-after"), reply.text
            last = ""
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"]
                    last = finish or last
            return 200, None, last


def test_a_burst_past_max_num_waiting_gets_429_and_every_accepted_stream_completes(stack):
    async def burst() -> list:
        return await asyncio.gather(*(one_stream(stack.addresses["http"], i) for i in range(40)))

    results = asyncio.run(burst())
    refused = [r for r in results if r[0] == 429]
    accepted = [r for r in results if r[0] == 200]
    assert len(refused) + len(accepted) == 40
    assert refused and accepted
    assert all(retry == "1" and "--max-num-waiting" in text for _, retry, text in refused)
    assert all(finish == "length" for _, _, finish in accepted)
    # gRPC sees the same bound: RESOURCE_EXHAUSTED with a retry-after trailer
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))

    def generate(i: int) -> grpc.StatusCode:
        try:
            for _ in stub.Generate(greedy([2, 70 + i], 40), metadata=(("authorization", f"Bearer {KEY_A}"),)):
                pass
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert ("retry-after", "1") in exc.trailing_metadata()
            return exc.code()

    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(generate, range(40)))
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    metrics = httpx.get(f"{stack.addresses['http']}/metrics").text
    assert 'fastserve:request_rejected_total{reason="overloaded"}' in metrics


def test_slowloris_connections_are_closed_after_the_header_timeout(stack):
    address = http_address(stack)
    sockets = []
    for _ in range(20):
        sock = socket.create_connection(address, timeout=60)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        sockets.append(sock)
    start = time.monotonic()
    closed = 0
    for sock in sockets:  # one more header byte now and then must not keep it open
        try:
            while time.monotonic() - start < 60:
                sock.sendall(b"X")
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            closed += 1
        finally:
            sock.close()
    assert closed == 20
    assert time.monotonic() - start < 60  # closed by the server, not by this loop's end


def test_streams_whose_clients_never_read_are_cancelled_and_their_blocks_freed(stack):
    address = http_address(stack)
    body = json.dumps(
        {"prompt": [2, 80], "max_tokens": 1800, "ignore_eos": True, "stream": True, "logprobs": 20}
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    silent = []
    for _ in range(3):  # within --max-num-waiting
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.connect(address)
        sock.sendall(head + body)
        silent.append(sock)
    try:
        deadline = time.monotonic() + 120
        while (kv_stats(stack).num_jobs or stalled(stack) < 3) and time.monotonic() < deadline:
            time.sleep(0.5)
        stats = kv_stats(stack)
        assert stats.num_jobs == 0 and stats.free_gpu_blocks == stats.num_gpu_blocks
        assert stalled(stack) >= 3
    finally:
        for sock in silent:
            sock.close()


def stalled(stack) -> float:
    """fastserve:stream_stalled_total: streams cancelled because their client stopped reading."""
    for line in httpx.get(f"{stack.addresses['http']}/metrics").text.splitlines():
        if line.startswith("fastserve:stream_stalled_total"):
            return float(line.split()[-1])
    return 0.0


def test_another_key_can_neither_learn_nor_take_over_a_request_id(stack):
    base = stack.addresses["http"]
    a = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY_A, max_retries=0)
    b = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY_B, max_retries=0)
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))

    def get(key: str, request_id: str) -> gateway_pb2.RequestInfo:
        return stub.GetRequest(
            gateway_pb2.GetRequestRequest(request_id=request_id),
            metadata=(("authorization", f"Bearer {key}"),),
        )

    # A's request in flight: B's request with the same id is not refused as "in flight", and runs
    stream = a.completions.create(
        model=MODEL,
        prompt=[2, 90],
        max_tokens=400,
        extra_body={"ignore_eos": True},
        stream=True,
        extra_headers={"X-Request-Id": "shared-id"},
    )
    next(iter(stream))
    reply_b = b.completions.create(
        model=MODEL,
        prompt=[2, 91],
        max_tokens=3,
        extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": "shared-id"},
    )
    assert reply_b.id == "cmpl-shared-id" and reply_b.choices[0].finish_reason == "length"
    for _ in stream:
        pass
    # finished: each key sees its own record under the id, never the other's
    info_a, info_b = (
        settled_info(stub, "shared-id", (("authorization", f"Bearer {k}"),)) for k in (KEY_A, KEY_B)
    )
    assert info_a.request_id == info_b.request_id == "shared-id"
    assert info_a.state == "finished" and info_a.generated_tokens == 400
    assert info_b.generated_tokens == 3
    # n > 1: B's completions' job ids do not meet A's
    reply_b = b.completions.create(
        model=MODEL, prompt=[2, 92], max_tokens=2, n=2, extra_headers={"X-Request-Id": "shared-id"}
    )
    assert len(reply_b.choices) == 2
    assert get(KEY_A, "shared-id").generated_tokens == 400
    with pytest.raises(grpc.RpcError) as missing:
        get(KEY_B, "only-a-knows")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_busy_http_port_is_refused_at_once_naming_it(redis_url):
    from fastserve.launcher import Stack, parse_args

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        flags = ["--port", str(free_port()), "--http-port", str(port), "--redis-url", redis_url]
        args = parse_args([*flags, "--demo", "false"])
        with pytest.raises(RuntimeError, match=f"--http-port {port}"):
            Stack(args).start()

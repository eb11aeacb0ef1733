"""The public port under hostile traffic, at scale: a stack of real processes attacked over loopback.

Starts `fastserve up` (opt-tiny, byte tokenizer) with --max-num-waiting and short HTTP timeouts,
then measures, one after the other:
- warm: ordinary traffic first (--warm-requests streamed completions, --warm-concurrency at a time,
  the bursts' request shape): a gateway that has served requests, as an operator sees it before a
  flash crowd; its RSS is the burst's "pre-burst" value;
- body: a 50 MB body (declared Content-Length, then chunked) -> time to the 413, the gateway's RSS
  growth, and the longest gap between chunks of streams in flight meanwhile; a 10 MB chat message;
- burst: --streams concurrent HTTP streams (and --grpc-streams gRPC ones) -> how many got 429 with
  Retry-After (RESOURCE_EXHAUSTED), whether every accepted one completed, RSS before / peak / after;
- slowloris: --slowloris connections dribbling header bytes -> how many the server closed, and when;
- silent: --silent streams whose clients never read -> cancelled, the kvmanager's blocks free again.
Prints and saves JSON.

    python -m fastserve.bench.hostile --json docs/results/hostile.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

import grpc

from fastserve.internal_auth import METADATA_KEY
from fastserve.launcher import Stack
from fastserve.launcher import parse_args as up_args
from fastserve.procs import free_port
from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, kvmanager_pb2, kvmanager_pb2_grpc


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def kv_stats(stack: Stack) -> kvmanager_pb2.KVStats:
    with grpc.insecure_channel(stack.addresses["kvmanager"]) as chan:
        stub = kvmanager_pb2_grpc.KVManagerStub(chan)
        return stub.Stats(kvmanager_pb2.StatsRequest(), metadata=((METADATA_KEY, stack.token),), timeout=10)


def completion_request(address: tuple[str, int], body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {address[0]}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def stream(address: tuple[str, int], body: dict, gaps: list[tuple[float, float]] | None = None) -> dict:
    """One streamed completion over a raw connection: its status, Retry-After, and whether it finished."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(completion_request(address, body))
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        retry = next(
            (
                line.split(b":", 1)[1].strip().decode()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"retry-after")
            ),
            None,
        )
        if status != 200:
            return {"status": status, "retry_after": retry}
        tail, last = b"", time.monotonic()
        while b"[DONE]" not in tail:
            chunk = await reader.read(65536)
            if not chunk:
                break
            now = time.monotonic()
            if gaps is not None:
                gaps.append((now, now - last))
            last = now
            tail = (tail + chunk)[-4096:]
        return {"status": 200, "done": b"[DONE]" in tail, "length": b'"finish_reason":"length"' in tail}
    finally:
        writer.close()


async def send_50mb(writer: asyncio.StreamWriter, chunked: bool) -> None:
    piece = b"x" * 65536
    for _ in range(763):
        writer.write(b"10000\r\n" + piece + b"\r\n" if chunked else piece)
        await writer.drain()


async def probe_health(address: tuple[str, int], latencies: list[tuple[float, float]]) -> None:
    """GET /health every 20 ms on one keep-alive connection: how long the gateway's loop takes to answer."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        while True:
            start = time.monotonic()
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            latencies.append((start, time.monotonic() - start))
            await asyncio.sleep(0.02)
    finally:
        writer.close()


async def body_attack(stack: Stack, address: tuple[str, int], pid: int) -> dict:
    """50 MB bodies while 4 streams run: time to 413, RSS growth, the longest gap the streams saw
    and the slowest /health answer (the gateway's event loop), before and during."""
    gaps: list[tuple[float, float]] = []
    health: list[tuple[float, float]] = []
    body = {"prompt": [2, 70], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    streams = [asyncio.create_task(stream(address, body, gaps)) for _ in range(4)]
    prober = asyncio.create_task(probe_health(address, health))
    await asyncio.sleep(2)  # streams going
    rss_before = rss_mb(pid)
    out: dict = {}
    for kind in ("content-length", "chunked"):
        reader, writer = await asyncio.open_connection(*address)
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += (
            "Content-Length: 50000000\r\n\r\n"
            if kind == "content-length"
            else "Transfer-Encoding: chunked\r\n\r\n"
        )
        start = time.monotonic()
        writer.write(head.encode())

        sender = asyncio.create_task(send_50mb(writer, chunked=kind == "chunked"))
        answer = await reader.readuntil(b"\r\n\r\n")
        took = time.monotonic() - start
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
        out[kind] = {"status": int(answer.split(b" ", 2)[1]), "seconds_to_answer": round(took, 3)}
        out[kind]["window"] = (start, time.monotonic())
    out["rss_before_mb"] = round(rss_before, 1)
    out["rss_after_mb"] = round(rss_mb(pid), 1)
    out["rss_growth_mb"] = round(out["rss_after_mb"] - rss_before, 1)
    results = await asyncio.gather(*streams)
    windows = [out[k].pop("window") for k in ("content-length", "chunked")]
    during = [gap for at, gap in gaps if any(a <= at <= b + 0.5 for a, b in windows)]
    before = [gap for at, gap in gaps if at < windows[0][0]]
    out["stream_max_gap_ms_during"] = round(1000 * max(during, default=0), 1)
    out["stream_max_gap_ms_before"] = round(1000 * max(before, default=0), 1)
    prober.cancel()
    await asyncio.gather(prober, return_exceptions=True)
    during = [lag for at, lag in health if any(a <= at <= b + 0.5 for a, b in windows)]
    before = [lag for at, lag in health if at < windows[0][0]]
    out["health_max_ms_during"] = round(1000 * max(during, default=0), 1)
    out["health_max_ms_before"] = round(1000 * max(before, default=0), 1)
    out["streams_completed"] = sum(r.get("done", False) for r in results)
    # a 10 MB chat message: refused by size, never tokenized
    reader, writer = await asyncio.open_connection(*address)
    data = json.dumps({"messages": [{"role": "user", "content": "x" * (10 << 20)}]}).encode()
    start = time.monotonic()
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    answer = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    out["chat_10mb"] = {
        "status": int(answer.split(b" ", 2)[1]),
        "seconds_to_answer": round(time.monotonic() - start, 3),
    }
    return out


async def warm(address: tuple[str, int], pid: int, count: int, concurrency: int, settle: float) -> dict:
    body = {"prompt": [2, 75], "max_tokens": 32, "ignore_eos": True, "stream": True}
    gate = asyncio.Semaphore(concurrency)
    rss_start = rss_mb(pid)

    async def one() -> dict:
        async with gate:
            return await stream(address, body)

    results = await asyncio.gather(*(one() for _ in range(count)))
    await asyncio.sleep(settle)
    return {
        "requests": count,
        "concurrency": concurrency,
        "completed": sum(r.get("done", False) for r in results),
        "rss_start_mb": round(rss_start, 1),
        "rss_after_mb": round(rss_mb(pid), 1),
    }


async def grpc_stream(stub: gateway_pb2_grpc.GatewayStub, prompt: list[int], max_tokens: int) -> str:
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    try:
        last = None
        async for reply in stub.Generate(request, timeout=600):
            last = reply
        return "ok" if last and last.finish_reason == common_pb2.FinishReason.FINISH_REASON_LENGTH else "lost"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def burst(stack: Stack, address: tuple[str, int], pid: int, args: argparse.Namespace) -> dict:
    rss_before = rss_mb(pid)
    peak = rss_before
    body = {"prompt": [2, 75], "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True}
    start = time.monotonic()
    tasks = [asyncio.create_task(stream(address, body)) for _ in range(args.streams)]
    while not all(t.done() for t in tasks):
        peak = max(peak, rss_mb(pid))
        await asyncio.sleep(0.2)
    results = [t.result() if not t.exception() else {"status": -1} for t in tasks]
    took = time.monotonic() - start
    await asyncio.sleep(args.settle)
    rss_after = rss_mb(pid)
    async with grpc.aio.insecure_channel(stack.addresses["gateway"]) as channel:  # then a gRPC burst
        stub = gateway_pb2_grpc.GatewayStub(channel)
        grpc_codes = await asyncio.gather(
            *(grpc_stream(stub, [2, 76], args.max_tokens) for _ in range(args.grpc_streams))
        )
    await asyncio.sleep(args.settle)
    accepted = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    return {
        "streams": args.streams,
        "accepted": len(accepted),
        "completed": sum(r["done"] and r["length"] for r in accepted),
        "refused_429": len(refused),
        "refused_with_retry_after": sum(r["retry_after"] is not None for r in refused),
        "other": len(results) - len(accepted) - len(refused),
        "grpc_streams": args.grpc_streams,
        "grpc_ok": grpc_codes.count("ok"),
        "grpc_resource_exhausted": grpc_codes.count("RESOURCE_EXHAUSTED"),
        "seconds": round(took, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_after_grpc_mb": round(rss_mb(pid), 1),
    }


async def slowloris(address: tuple[str, int], count: int, timeout: float) -> dict:
    async def one() -> float | None:
        reader, writer = await asyncio.open_connection(*address)
        start = time.monotonic()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        try:
            while time.monotonic() - start < timeout + 30:
                writer.write(b"X")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), 0.5) == b"":
                        return time.monotonic() - start
                except TimeoutError:
                    pass
            return None
        except (ConnectionError, OSError):
            return time.monotonic() - start
        finally:
            writer.close()

    closed = await asyncio.gather(*(one() for _ in range(count)))
    times = [t for t in closed if t is not None]
    return {
        "connections": count,
        "closed_by_server": len(times),
        "header_timeout_s": timeout,
        "closed_after_s_max": round(max(times, default=0), 2),
        "closed_after_s_min": round(min(times, default=0), 2),
    }


def silent(stack: Stack, address: tuple[str, int], count: int, send_timeout: float) -> dict:
    body = {"prompt": [2, 80], "max_tokens": 1800, "ignore_eos": True, "stream": True, "logprobs": 20}
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(address)
        sock.sendall(completion_request(address, body))
        sockets.append(sock)
    start = time.monotonic()
    busy = kv_stats(stack)
    peak_jobs = busy.num_jobs
    while time.monotonic() - start < 300:
        stats = kv_stats(stack)
        peak_jobs = max(peak_jobs, stats.num_jobs)
        if stats.num_jobs == 0 and time.monotonic() - start > 1:
            break
        time.sleep(0.25)
    freed_after = time.monotonic() - start
    stats = kv_stats(stack)
    for sock in sockets:
        sock.close()
    return {
        "streams": count,
        "stream_send_timeout_s": send_timeout,
        "peak_jobs": peak_jobs,
        "all_freed_after_s": round(freed_after, 1),
        "jobs_after": stats.num_jobs,
        "free_gpu_blocks": stats.free_gpu_blocks,
        "num_gpu_blocks": stats.num_gpu_blocks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastserve.bench.hostile", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--grpc-streams", type=int, default=600)
    parser.add_argument("--settle", type=float, default=12.0, help="seconds after a burst before RSS is read")
    parser.add_argument("--phases", default="warm,body,burst,slowloris,silent")
    parser.add_argument("--warm-requests", type=int, default=200)
    parser.add_argument("--warm-concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-waiting", type=int, default=256)
    parser.add_argument("--slowloris", type=int, default=300)
    parser.add_argument("--silent", type=int, default=50)
    parser.add_argument("--header-timeout", type=float, default=5.0)
    parser.add_argument("--send-timeout", type=float, default=5.0)
    parser.add_argument("--gateway-pythonmalloc", default="", choices=["", "pymalloc", "malloc"])
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    http_port = free_port()
    flags = ["--port", str(free_port()), "--http-port", str(http_port), "--demo", "false"]
    flags += ["--max-model-len", "2048", "--num-gpu-blocks", "4096", "--max-num-seqs", "64"]
    flags += ["--max-num-waiting", str(args.max_num_waiting), "--max-concurrent-requests", "4096"]
    flags += [
        "--http-header-timeout",
        str(args.header_timeout),
        "--stream-send-timeout",
        str(args.send_timeout),
    ]
    if args.gateway_pythonmalloc:
        flags += ["--gateway-pythonmalloc", args.gateway_pythonmalloc]
    stack = Stack(up_args([*flags, "--log-level", "ERROR"]))
    try:
        stack.start()
        pid = stack.child("gateway").proc.pid
        address = ("127.0.0.1", http_port)
        results = {"flags": flags}
        phases = {
            "warm": lambda: asyncio.run(
                warm(address, pid, args.warm_requests, args.warm_concurrency, args.settle)
            ),
            "body": lambda: asyncio.run(body_attack(stack, address, pid)),
            "burst": lambda: asyncio.run(burst(stack, address, pid, args)),
            "slowloris": lambda: asyncio.run(slowloris(address, args.slowloris, args.header_timeout)),
            "silent": lambda: silent(stack, address, args.silent, args.send_timeout),
        }
        for name in args.phases.split(","):
            key = name if name not in results else f"{name}{sum(k.startswith(name) for k in results) + 1}"
            results[key] = phases[name]()
            print(json.dumps({key: results[key]}), flush=True)
    finally:
        stack.stop()
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

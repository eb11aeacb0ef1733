"""Chaos: a bounded load while a random service is SIGKILLed every few seconds.

Starts `fastserve up` (its supervisor, its embedded Redis with AOF), sends --requests greedy
requests (--concurrency at a time, random prompts and lengths) through the gateway, and every
--kill-every seconds SIGKILLs one of --targets at random. Counts requests submitted, completed
(every token, finish LENGTH) and lost (an error, or a wrong token count), and per kill: how long
the service was down (kill -> its replacement answers) and how long tokens stalled (kill -> the
first token after the replacement is up). Prints and saves JSON (and a plot with --plot).

    python -m fastserve.bench.chaos --requests 300 --kill-every 6 --json docs/results/chaos.json --plot docs/results/chaos.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import threading
import time

import grpc
import redis

from fastserve.launcher import Stack
from fastserve.launcher import parse_args as up_args
from fastserve.procs import free_port
from fastserve.rpc import check_serving_sync
from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

FR = common_pb2.FinishReason


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastserve.bench.chaos", description=__doc__)
    parser.add_argument("--model", default="opt-tiny")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--kill-every", type=float, default=6.0, help="seconds between kills")
    parser.add_argument("--targets", default="scheduler,kvmanager,worker0,redis,gateway")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    parser.add_argument("--plot", default="")
    return parser.parse_args(argv)


class Chaos:
    def __init__(self, stack: Stack, targets: list[str], every: float, rng: random.Random) -> None:
        self.stack, self.targets, self.every, self.rng = stack, targets, every, rng
        self.kills: list[dict] = []
        self.arrivals: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            target = self.rng.choice(self.targets)
            victim = self.stack.child(target).proc
            if victim is None or victim.poll() is not None:
                continue
            killed = time.monotonic()
            victim.kill()
            back = self._back_up(target, victim.pid)
            self.kills.append({"target": target, "at": killed, "back": back})

    def _back_up(self, target: str, old_pid: int) -> float | None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            proc = self.stack.child(target).proc
            if proc is not None and proc.pid != old_pid and proc.poll() is None and self._answers(target):
                return time.monotonic()
            time.sleep(0.05)
        return None

    def _answers(self, target: str) -> bool:
        if target == "redis":
            try:
                return bool(redis.Redis.from_url(self.stack.addresses["redis"]).ping())
            except redis.exceptions.RedisError:
                return False
        return check_serving_sync(self.stack.addresses[target])

    def report(self) -> list[dict]:
        out = []
        for kill in self.kills:
            after = [t for t in self.arrivals if kill["back"] and t > kill["back"]]
            out.append(
                {
                    "target": kill["target"],
                    "at_s": kill["at"],
                    "down_s": (kill["back"] - kill["at"]) if kill["back"] else None,
                    "stall_s": (min(after) - kill["at"]) if after else None,
                }
            )
        return out


async def one_request(stub, i: int, rng: random.Random, chaos: Chaos, args) -> dict:
    max_tokens = rng.randint(args.min_tokens, args.max_tokens)
    prompt = [2, *(rng.randrange(4, 250) for _ in range(rng.randint(4, 48)))]
    request = gateway_pb2.GenerateRequest(
        request_id=f"chaos-{i}",
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    started, tokens, last = time.monotonic(), 0, None
    try:
        async for reply in stub.Generate(request, timeout=900):
            tokens += len(reply.token_ids)
            chaos.arrivals.append(time.monotonic())
            last = reply
    except grpc.aio.AioRpcError as exc:
        return {
            "ok": False,
            "error": f"{exc.code().name}: {exc.details()}",
            "latency": time.monotonic() - started,
        }
    ok = last is not None and last.finish_reason == FR.FINISH_REASON_LENGTH and tokens == max_tokens
    error = "" if ok else f"{tokens}/{max_tokens} tokens, finish {last.finish_reason if last else None}"
    return {"ok": ok, "error": error, "latency": time.monotonic() - started}


async def load(address: str, chaos: Chaos, args) -> list[dict]:
    rng = random.Random(args.seed)
    results: list[dict] = []
    queue = list(range(args.requests))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def client() -> None:
            while queue:
                results.append(
                    await one_request(stub, queue.pop(0), random.Random(rng.random()), chaos, args)
                )

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return results


def summarize(results: list[dict], kills: list[dict], wall: float, args) -> dict:
    by_kind: dict[str, dict] = {}
    for target in sorted({k["target"] for k in kills}):
        mine = [k for k in kills if k["target"] == target]
        stalls = [k["stall_s"] for k in mine if k["stall_s"] is not None]
        downs = [k["down_s"] for k in mine if k["down_s"] is not None]
        by_kind[target] = {
            "kills": len(mine),
            "down_s_mean": statistics.mean(downs) if downs else None,
            "stall_s_mean": statistics.mean(stalls) if stalls else None,
            "stall_s_max": max(stalls) if stalls else None,
        }
    lost = [r for r in results if not r["ok"]]
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
        "wall_s": wall,
        "submitted": len(results),
        "completed": len(results) - len(lost),
        "lost": len(lost),
        "errors": sorted({r["error"] for r in lost})[:20],
        "latency_s_mean": statistics.mean(r["latency"] for r in results),
        "kills": kills,
        "by_kind": by_kind,
        "machine": "shared 2-core CPU machine (other jobs running), opt-tiny dummy weights",
    }


def plot(summary: dict, arrivals: list[float], t0: float, path: str) -> None:
    from fastserve.bench.plot import plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    times = [t - t0 for t in arrivals]
    if times:
        ax.hist(times, bins=range(0, int(max(times)) + 2), color="tab:blue", alpha=0.7)
    for kill in summary["kills"]:
        ax.axvline(kill["at_s"] - t0, color="tab:red", lw=1)
        ax.text(
            kill["at_s"] - t0,
            ax.get_ylim()[1] * 0.9,
            kill["target"],
            rotation=90,
            fontsize=7,
            color="tab:red",
        )
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens / s")
    ax.set_title(
        f"chaos: {summary['submitted']} requests, {summary['lost']} lost, {len(summary['kills'])} SIGKILLs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    data_dir = tempfile.mkdtemp(prefix="fastserve-chaos-")
    stack = Stack(
        up_args(
            [
                *(
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--redis-url",
                    "",
                    "--data-dir",
                    data_dir,
                ),
                *("--model", args.model, "--tp", str(args.tp), "--max-batch-size", str(args.max_batch_size)),
                *(
                    "--num-gpu-blocks",
                    "256",
                    "--num-threads",
                    "1",
                    "--demo",
                    "false",
                    "--log-level",
                    "WARNING",
                ),
                *("--max-restarts-per-minute", "30", "--http-port", "0"),
            ]
        )
    )
    try:
        gateway = stack.start()
        stack.supervise_in_background()
        chaos = Chaos(stack, args.targets.split(","), args.kill_every, random.Random(args.seed))
        killer = threading.Thread(target=chaos.run, daemon=True)
        t0 = time.monotonic()
        killer.start()
        results = asyncio.run(load(gateway, chaos, args))
        chaos.done.set()
        killer.join()
        summary = summarize(results, chaos.report(), time.monotonic() - t0, args)
    finally:
        stack.stop()
    for kill in summary["kills"]:
        kill["at_s"] -= t0
    print(json.dumps({k: v for k, v in summary.items() if k != "kills"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.plot:
        for kill in summary["kills"]:
            kill["at_s"] += t0
        plot(summary, chaos.arrivals, t0, args.plot)
    return 0 if summary["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

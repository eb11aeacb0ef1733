"""`fastserve generate`: streams one completion from a gateway to the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import grpc

from fastserve.flags import add_flag
from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def stream_generate(
    address: str,
    prompt: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    out: TextIO = sys.stdout,
) -> gateway_pb2.GenerateResponse:
    """Writes text to `out` as it arrives; returns the final message."""
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop or [],
        ignore_eos=ignore_eos,
    )
    with grpc.insecure_channel(address) as chan:
        stub = gateway_pb2_grpc.GatewayStub(chan)
        last = gateway_pb2.GenerateResponse()
        for reply in stub.Generate(gateway_pb2.GenerateRequest(prompt=prompt, sampling=sampling)):
            out.write(reply.text)
            out.flush()
            last = reply
    out.write("\n")
    reason = common_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    out.write(
        f"[{reason}; {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} completion tokens"
        f"{'; ' + last.error if last.error else ''}]\n"
    )
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastserve generate", description=__doc__, allow_abbrev=False)
    parser.add_argument("prompt")
    add_flag(parser, "--address", default="127.0.0.1:50051", help="gateway address")
    parser.add_argument("--max-tokens", type=int, default=None, help="default 16, as in the API")
    parser.add_argument("--temperature", type=float, default=None, help="default 1.0; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    args = parser.parse_args(argv)
    try:
        last = stream_generate(
            args.address,
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
        )
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0 if last.finish_reason != common_pb2.FINISH_REASON_ERROR else 1

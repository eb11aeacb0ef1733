"""FastServe's HTTP port and `transformers serve` side by side: one trace, one checkpoint.

Builds a small random OPT checkpoint with a byte-level Hugging Face tokenizer (one
token per character, the ids of FastServe's byte tokenizer), so both servers see the
same prompt tokens from the same text. Its generation_config sets `min_new_tokens` at
the model's length: transformers has no `ignore_eos`, and this keeps it from stopping
at EOS before `max_tokens`, as FastServe does with `ignore_eos`. Then, one server at a
time: `fastserve up` (skip-join MLFQ) and `transformers serve` (without continuous
batching, which does not support OPT), each replayed the same trace with
`fastserve bench --backend openai --prompt-format text`. Prints a table and appends
both results to --json.

    python -m fastserve.bench.vs_transformers --json docs/results/vs_transformers.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from fastserve.procs import free_port


def make_checkpoint(path: Path, layers: int, hidden: int, max_positions: int) -> Path:
    """A random OPT with a byte-level tokenizer: byte b is token b + 4 (FastServe's byte tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    config = OPTConfig(
        vocab_size=272,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        ffn_dim=4 * hidden,
        max_position_embeddings=max_positions,
        word_embed_proj_dim=hidden,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = OPTForCausalLM(config).eval()
    model.generation_config.min_new_tokens = max_positions  # never stop at EOS (no ignore_eos there)
    model.save_pretrained(path)

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 characters that stand for bytes
    byte_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=byte_of), strict=True)}
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{byte_char[b]: b + 4 for b in range(256)}}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.decoder = decoders.ByteLevel()
    inner.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=inner, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(path)
    return path


def byte_of(char: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's printable mapping)."""
    code = ord(char)
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # it answers, and wants an API key: it is up
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f}s")


def run_server(name: str, cmd: list[str], port: int, bench_argv: list[str], log: Path, env: dict) -> dict:
    from fastserve.bench.load import main as bench_main

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 600)
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            path = f"{tmp}/result.json"
            bench_main(
                [*bench_argv, "--base-url", f"http://127.0.0.1:{port}", "--label", name, "--json", path]
            )
            (result,) = json.loads(Path(path).read_text())
        return result
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def table(results: list[dict]) -> str:
    lines = [
        "| server | req/s | output tok/s | TTFT mean / P99 (ms) | TPOT mean (ms) | ITL mean (ms) | E2E mean / P99 (s) | latency per token mean (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['policy']} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | "
            f"{r['ttft']['mean'] * 1e3:.0f} / {r['ttft']['p99'] * 1e3:.0f} | {r['tpot']['mean'] * 1e3:.1f} | "
            f"{r['itl']['mean'] * 1e3:.1f} | {r['jct']['mean']:.2f} / {r['jct']['p99']:.2f} | "
            f"{r['latency_per_token']['mean'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastserve.bench.vs_transformers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--max-positions", type=int, default=512)
    parser.add_argument("--workload", default="alpaca")
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--max-input-len", type=int, default=128)
    parser.add_argument("--max-output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each server")
    parser.add_argument("--json", default="", help="append both results to this JSON file")
    args = parser.parse_args(argv)

    transformers_cli = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    bench_argv = ["--backend", "openai", "--prompt-format", "text", "--workload", args.workload]
    bench_argv += ["--num-requests", str(args.num_requests), "--rate", str(args.rate)]
    bench_argv += ["--max-input-len", str(args.max_input_len), "--max-output-len", str(args.max_output_len)]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "opt", args.layers, args.hidden, args.max_positions)
        results = []
        port = free_port()
        fastserve = [
            sys.executable,
            "-m",
            "fastserve.cli",
            "up",
            "--model",
            str(checkpoint),
            "--demo",
            "false",
        ]
        fastserve += [
            "--port",
            str(free_port()),
            "--http-port",
            str(port),
            "--num-threads",
            str(args.threads),
        ]
        fastserve += ["--served-model-name", "opt", "--log-level", "WARNING"]
        results.append(
            run_server("FastServe (skip-join MLFQ)", fastserve, port, bench_argv, Path(tmp) / "fs.log", env)
        )
        port = free_port()
        hf = [transformers_cli, "serve", str(checkpoint), "--port", str(port), "--host", "127.0.0.1"]
        hf += ["--device", "cpu", "--dtype", "float32"]
        # transformers refuses ignore_eos; the checkpoint's min_new_tokens keeps it from stopping early
        hf_argv = [*bench_argv, "--ignore-eos", "false"]
        results.append(run_server("transformers serve", hf, port, hf_argv, Path(tmp) / "hf.log", env))
    print(table(results))
    if args.json:
        path = Path(args.json)
        existing = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*existing, *results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our worker's model vs Hugging Face ``OPTForCausalLM`` on the same weights, on this machine's CPU.

For each (batch, context) case it times both sides, interleaved so machine noise hits them alike:

* ``prefill``: one iteration feeding ``batch`` prompts of ``context`` tokens.
  Ours: ``ModelRunner.step`` (input preparation, KV writes and greedy sampling included).
  HF: ``model(input_ids, use_cache=True, logits_to_keep=1)`` + argmax, which is what
  ``generate`` runs (logits of the last position only).
* ``decode``: ``--decode-steps`` consecutive iterations of one token per sequence after that
  prefill, ours and HF's alternating iteration by iteration. Ours: ``step`` over the paged KV
  cache. HF: forward of ``[batch, 1]`` tokens with its ``DynamicCache`` + argmax.

``ratio`` = median(ours) / median(HF); ``paired`` = median over pairs of adjacent (ours, HF)
measurements of ours / HF, the steadier number on a noisy machine. Below 1 = we are faster.
Weights: a randomly initialised HF model of the preset's shape, saved as a checkpoint that our
loader reads, so both sides multiply the same numbers; ``agree`` says whether both sides'
greedy tokens were identical throughout.

    python -m fastserve.bench.model_vs_hf --model opt-125m --batch-sizes 1,16 --contexts 128,512
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastserve.model_spec import PRESETS, resolve_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastserve.bench.model_vs_hf", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--model", default="opt-125m", help=f"preset shape ({', '.join(PRESETS)})")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--contexts", default="128,512", help="prompt tokens per sequence, comma list")
    p.add_argument("--decode-steps", type=int, default=16, help="decode iterations timed per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--out", default="out/model_vs_hf.json", help="JSON results path (a .png plot goes beside it)"
    )
    return p


def make_checkpoint(preset: str, directory: Path) -> Path:
    """A randomly initialised HF model of the preset's shape, saved as a checkpoint."""
    from transformers import OPTConfig, OPTForCausalLM

    spec = PRESETS[preset]
    config = OPTConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        ffn_dim=spec.ffn_dim,
        max_position_embeddings=spec.max_positions,
        word_embed_proj_dim=spec.word_embed_proj_dim,
        do_layer_norm_before=spec.do_layer_norm_before,
        pad_token_id=spec.pad_token_id,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
    )
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(directory)
    return directory


class Ours:
    def __init__(self, checkpoint: Path, batch: int, context: int, steps: int, block_size: int) -> None:
        from fastserve.services.worker.runner import ModelRunner

        self.spec = resolve_model(str(checkpoint))
        self.blocks_per_seq = -(-(context + steps + 1) // block_size)
        self.runner = ModelRunner(
            self.spec,
            dtype=torch.float32,
            device="cpu",
            num_gpu_blocks=batch * self.blocks_per_seq,
            block_size=block_size,
        )

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        from fastserve.services.worker.runner import SeqWork

        self.tables = [
            list(range(i * self.blocks_per_seq, (i + 1) * self.blocks_per_seq)) for i in range(len(prompts))
        ]
        self.pos = len(prompts[0])
        work = [SeqWork(f"r{i}", p, 0, t) for i, (p, t) in enumerate(zip(prompts, self.tables, strict=True))]
        return self.runner.step(work)

    def decode(self, tokens: list[int]) -> list[int]:
        from fastserve.services.worker.runner import SeqWork

        work = [
            SeqWork(f"r{i}", [tok], self.pos, t)
            for i, (tok, t) in enumerate(zip(tokens, self.tables, strict=True))
        ]
        self.pos += 1
        return self.runner.step(work)


class HF:
    def __init__(self, checkpoint: Path) -> None:
        from transformers import OPTForCausalLM

        self.model = OPTForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> list[int]:
        out = self.model(torch.tensor(prompts), use_cache=True, logits_to_keep=1)
        self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits[:, -1].argmax(-1).tolist()

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> list[int]:
        out = self.model(torch.tensor(tokens)[:, None], cache=self.cache, use_cache=True)
        self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits[:, -1].argmax(-1).tolist()


def bench_case(checkpoint: Path, batch: int, context: int, args: argparse.Namespace) -> dict:
    """One (batch, context) case: interleaved timings of both sides."""
    spec = resolve_model(str(checkpoint))
    gen = torch.Generator().manual_seed(batch * 100003 + context)
    prompts = torch.randint(4, spec.vocab_size, (batch, context), generator=gen).tolist()
    sides = {
        "ours": Ours(checkpoint, batch, context, args.decode_steps, args.block_size),
        "hf": HF(checkpoint),
    }
    prefill: dict[str, list[float]] = {"ours": [], "hf": []}
    decode: dict[str, list[float]] = {"ours": [], "hf": []}
    agree = True
    for repeat in range(args.repeats + 1):  # round 0 warms up
        names = ["ours", "hf"] if repeat % 2 else ["hf", "ours"]
        tokens: dict[str, list[int]] = {}
        generated: dict[str, list[list[int]]] = {"ours": [], "hf": []}
        for name in names:
            started = time.perf_counter()
            tokens[name] = sides[name].prefill(prompts)
            if repeat:
                prefill[name].append(time.perf_counter() - started)
            generated[name].append(tokens[name])
        for _ in range(args.decode_steps):  # one iteration each, alternately
            for name in names:
                started = time.perf_counter()
                tokens[name] = sides[name].decode(tokens[name])
                if repeat:
                    decode[name].append(time.perf_counter() - started)
                generated[name].append(tokens[name])
        agree = agree and generated["ours"] == generated["hf"]
    row: dict = {"batch": batch, "context": context, "greedy_tokens_agree": agree}
    for phase, times in (("prefill", prefill), ("decode", decode)):
        pairs = [o / h for o, h in zip(times["ours"], times["hf"], strict=True)]
        row[phase] = {
            "ours_ms": statistics.median(times["ours"]) * 1e3,
            "hf_ms": statistics.median(times["hf"]) * 1e3,
            "ratio": statistics.median(times["ours"]) / statistics.median(times["hf"]),
            "paired_ratio": statistics.median(pairs),
            "samples": len(pairs),
        }
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"B={r['batch']}\nL={r['context']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.5))
    for offset, phase in ((-0.2, "prefill"), (0.2, "decode")):
        ax.bar([x + offset for x in xs], [r[phase]["paired_ratio"] for r in rows], width=0.4, label=phase)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("time ours / HF (paired median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastserve-bench-") as tmp:
        checkpoint = make_checkpoint(args.model, Path(tmp))
        print(
            f"{args.model} fp32 on CPU ({torch.get_num_threads()} threads), {args.decode_steps} decode steps x "
            f"{args.repeats} repeats; medians; ratio = ours / HF, paired = median of adjacent ours/HF ratios"
        )
        print(
            f"{'batch':>5} {'context':>7} {'phase':>8} {'ours ms':>9} {'HF ms':>9} {'ratio':>6} {'paired':>6}  agree"
        )
        for context in contexts:
            for batch in batches:
                row = bench_case(checkpoint, batch, context, args)
                rows.append(row)
                for phase in ("prefill", "decode"):
                    r = row[phase]
                    print(
                        f"{batch:>5} {context:>7} {phase:>8} {r['ours_ms']:>9.2f} {r['hf_ms']:>9.2f} "
                        f"{r['ratio']:>6.3f} {r['paired_ratio']:>6.3f}  {row['greedy_tokens_agree']}"
                    )
    result = {
        "benchmark": "model_vs_hf",
        "model": args.model,
        "dtype": "float32",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "args": vars(args),
        "rows": rows,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        plot(rows, out.with_suffix(".png"), f"{args.model} fp32, CPU, {torch.get_num_threads()} threads")
        print(f"saved {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

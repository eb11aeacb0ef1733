"""Prompt scoring against transformers: what lm-evaluation-harness's loglikelihood requests get.

`make` builds a small OPT checkpoint with random weights and a real tokenizer (a byte-level BPE,
OPT's kind, trained with `tokenizers` on this repository's docs: no hub needed), so clients that
load a Hugging Face tokenizer (lm-eval's `tokenizer=`) can be pointed at the checkpoint directory.
`check` sends lm-eval's request (`echo: true, logprobs: 1, max_tokens: 0`, several prompts per
request) to a running server and compares every prompt token's logprob with
`OPTForCausalLM`'s log_softmax on the same checkpoint; it prints the largest difference.

python -m fastserve.bench.scoring_check make /tmp/opt-scoring
fastserve up --model /tmp/opt-scoring --http-port 24080 &
python -m fastserve.bench.scoring_check check /tmp/opt-scoring --base-url http://127.0.0.1:24080/v1
lm_eval --model local-completions ... --log_samples --output_path OUT   (docs/benchmarks.md)
python -m fastserve.bench.scoring_check lm-eval /tmp/opt-scoring OUT/*/samples_fastserve_mc_*.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0-3
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer: Paris",
    "FastServe schedules every iteration with a skip-join multi-level feedback queue.",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text, emoji 🚀 and numbers 12345 are scored as well.",
]


def corpus() -> list[str]:
    """Text to train the tokenizer on: the repository's docs and README."""
    root = Path(__file__).resolve().parent.parent
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [f.read_text(encoding="utf-8") for f in files if f.exists()] + TEXTS


def make(path: Path, vocab: int = 2048, layers: int = 4, hidden: int = 128, seed: int = 0) -> Path:
    """A random-weight OPT checkpoint plus a byte-level BPE tokenizer (vocab ids < `vocab`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    inner = Tokenizer(models.BPE(unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - 16, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    inner.train_from_iterator(corpus(), trainer)
    inner.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=inner, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        ffn_dim=4 * hidden,
        max_position_embeddings=512,
        word_embed_proj_dim=hidden,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if "layer_norm.weight" in name else 0.0) + 0.1 * torch.randn_like(param))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def check(path: Path, base_url: str, texts: list[str]) -> float:
    """The largest |server - transformers| over every scored prompt token of `texts`."""
    import openai
    from transformers import AutoTokenizer, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tokenizer.encode(t) for t in texts]
    api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    served = api.models.list().data[0].id
    reply = api.completions.create(model=served, prompt=prompts, echo=True, logprobs=1, max_tokens=0)
    worst = 0.0
    for choice, ids in zip(sorted(reply.choices, key=lambda c: c.index), prompts, strict=True):
        got = choice.logprobs.token_logprobs
        assert got[0] is None and len(got) == len(ids), (len(got), len(ids))
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        expected = [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]
        worst = max(worst, max(abs(a - b) for a, b in zip(got[1:], expected, strict=True)))
    print(
        json.dumps(
            {
                "prompts": len(prompts),
                "tokens_scored": sum(len(p) - 1 for p in prompts),
                "max_abs_diff": worst,
            }
        )
    )
    return worst


def check_lm_eval(path: Path, samples: Path) -> float:
    """The largest |lm-eval's loglikelihood - transformers'| over a `--log_samples` file of a
    multiple-choice task, encoding each (context, continuation) as lm-eval does (no special tokens,
    the context's trailing spaces moved to the continuation, the whole string split at the context)."""
    from transformers import AutoTokenizer, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    worst, count = 0.0, 0
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        for args, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, continuation = args["arg_0"], args["arg_1"]
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            start = len(tokenizer(context, add_special_tokens=False).input_ids)
            with torch.no_grad():
                lp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            expected = sum(float(lp[i - 1, whole[i]]) for i in range(start, len(whole)))
            worst = max(worst, abs(float(resp[0][0]) - expected))
            count += 1
    print(json.dumps({"loglikelihoods": count, "max_abs_diff": worst}))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="build the checkpoint")
    m.add_argument("path", type=Path)
    m.add_argument(
        "--vocab", type=int, default=2048, help="the model's vocabulary (the tokenizer's is smaller)"
    )
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--hidden", type=int, default=128)
    c = sub.add_parser("check", help="compare a running server's prompt logprobs with transformers")
    c.add_argument("path", type=Path)
    c.add_argument("--base-url", required=True)
    c.add_argument("--tolerance", type=float, default=1e-4)
    e = sub.add_parser("lm-eval", help="compare lm-eval's logged loglikelihoods with transformers")
    e.add_argument("path", type=Path)
    e.add_argument(
        "samples", type=Path, help="a samples_*.jsonl file of a multiple-choice task (--log_samples)"
    )
    e.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    if args.command == "make":
        print(make(args.path, vocab=args.vocab, layers=args.layers, hidden=args.hidden))
        return
    worst = (
        check(args.path, args.base_url, TEXTS)
        if args.command == "check"
        else check_lm_eval(args.path, args.samples)
    )
    if worst > args.tolerance:
        raise SystemExit(f"a logprob differs from transformers' by more than {args.tolerance}")


if __name__ == "__main__":
    main()

"""What the live stack is compared against: Hugging Face transformers on the same checkpoint."""

from __future__ import annotations

import threading
from functools import cache

import torch

from fastserve.v1 import common_pb2, gateway_pb2

# 8 requests of different prompt and output lengths (ids within the tiny checkpoint's 272-token vocabulary)
PROMPTS = [
    [2, 100, 200, 260],
    [2, 5, 17, 99, 250, 31, 7],
    [2, 40],
    [2, *range(10, 40)],
    [2, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26],
    [2, 230, 231, 232, 233, 234],
    [2, 9, 8, 7, 6, 5, 4, 3, 50, 60, 70, 80, 90],
    [2, *range(100, 145)],
]
MAX_TOKENS = [12, 20, 7, 16, 25, 9, 14, 18]


def greedy(prompt_ids: list[int], max_tokens: int, **extra) -> gateway_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return gateway_pb2.GenerateRequest(prompt_token_ids=prompt_ids, sampling=sampling, **extra)


def collect(stub, request) -> tuple[list[int], gateway_pb2.GenerateResponse]:
    tokens, last = [], None
    for reply in stub.Generate(request, timeout=300):
        tokens.extend(reply.token_ids)
        last = reply
    return tokens, last


def generate_concurrently(stub) -> dict[int, list[int]]:
    """The 8 reference requests at once, greedy; tokens by request index."""
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = collect(stub, greedy(PROMPTS[i], MAX_TOKENS[i]))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


@cache
def hf_model(checkpoint: str):
    from transformers import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def hf_generate(
    checkpoint: str, prompt_ids: list[int], max_tokens: int, processors=(), eos_token_id=()
) -> list[int]:
    """OPTForCausalLM.generate, greedy, float32, with extra logits processors, stopping only at eos_token_id."""
    from transformers import GenerationConfig, LogitsProcessorList

    config = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=list(eos_token_id), pad_token_id=1
    )
    with torch.no_grad():
        out = hf_model(checkpoint).generate(
            torch.tensor([list(prompt_ids)]),
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
        )
    return out[0, len(prompt_ids) :].tolist()


@cache
def hf_greedy(checkpoint: str, prompt_ids: tuple[int, ...], max_tokens: int) -> list[int]:
    """OPTForCausalLM.generate, greedy, float32, never stopping at EOS."""
    return hf_generate(checkpoint, list(prompt_ids), max_tokens)


def hf_log_softmax(checkpoint: str, token_ids: list[int]) -> torch.Tensor:
    """``[len, vocab]``: row i is the model's log-distribution of the token after token_ids[: i + 1]."""
    with torch.no_grad():
        logits = hf_model(checkpoint)(torch.tensor([token_ids])).logits[0]
    return logits.float().log_softmax(dim=-1)


def check_logprobs(checkpoint: str, prompt: list[int], tokens: list[int], replies, top: int) -> None:
    """Asserts the stream's logprobs (every generated token's, every prompt token's after the first,
    each with its top alternatives) equal transformers' log_softmax within 1e-4."""
    ref = hf_log_softmax(checkpoint, prompt + tokens)
    generated = [lp for r in replies for lp in r.logprobs]
    prompt_lps = [lp for r in replies for lp in r.prompt_logprobs]
    assert [lp.token_id for lp in generated] == tokens and len(prompt_lps) == len(prompt) - 1
    positions = [(len(prompt) - 1 + j, lp) for j, lp in enumerate(generated)]
    positions += [(i, lp) for i, lp in enumerate(prompt_lps)]
    for row, lp in positions:
        expected = ref[row]
        assert abs(lp.logprob - expected[lp.token_id].item()) <= 1e-4, (row, lp)
        assert lp.rank == int((expected > expected[lp.token_id]).sum()) + 1
        values, ids = expected.topk(top)
        assert [t.token_id for t in lp.top] == ids.tolist(), row
        assert max(abs(t.logprob - v) for t, v in zip(lp.top, values.tolist(), strict=True)) <= 1e-4

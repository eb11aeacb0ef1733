"""Sampling and outputs through the live stack, against transformers on the same checkpoint:
logprobs, penalties, min_tokens, stop tokens and strings with stop_reason, n > 1."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from transformers import LogitsProcessor, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.internal_rpc import drained_kv_stats
from tests.reference import MAX_TOKENS, PROMPTS, check_logprobs, hf_generate, hf_greedy

FR = common_pb2.FinishReason
EOS = 2


def gateway(stack) -> gateway_pb2_grpc.GatewayStub:
    return gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))


def generate(stub, prompt: list[int], **sampling) -> tuple[list[int], list[gateway_pb2.GenerateResponse]]:
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(temperature=0.0, **sampling)
    )
    replies = list(stub.Generate(request, timeout=300))
    return [t for r in replies for t in r.token_ids], replies


class PresenceFrequencyPenalty(LogitsProcessor):
    """vLLM's definition: minus frequency x (times generated) and presence x (generated at all);
    prompt tokens do not count."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_greedy_logprobs_equal_transformers_log_softmax(checkpoint_stack, tiny_checkpoint):
    stub = gateway(checkpoint_stack)
    for prompt in (PROMPTS[1], PROMPTS[3]):
        tokens, replies = generate(
            stub, prompt, max_tokens=10, ignore_eos=True, logprobs=5, prompt_logprobs=5
        )
        check_logprobs(tiny_checkpoint, prompt, tokens, replies, 5)


def test_penalties_and_min_tokens_equal_transformers_in_one_batch(checkpoint_stack, tiny_checkpoint):
    """8 concurrent requests with different settings; each greedy token equals transformers'."""
    plain = [hf_greedy(tiny_checkpoint, tuple(p), n) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
    # a stop token plain greedy would hit at its 2nd token: min_tokens keeps it (and EOS) masked until then
    settings = [
        {},
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.8},
        {"frequency_penalty": 0.7},
        {"presence_penalty": 1.2},
        {"frequency_penalty": -0.5, "presence_penalty": 0.5, "repetition_penalty": 1.1},
        {"min_tokens": 5, "stop_token_ids": [plain[6][1]]},
        {"min_tokens": 3, "repetition_penalty": 1.5, "stop_token_ids": [plain[7][1], plain[7][4]]},
    ]
    results: dict[int, tuple[list[int], list]] = {}

    def run(i: int) -> None:
        extra = {"ignore_eos": True} if "min_tokens" not in settings[i] else {}
        results[i] = generate(
            gateway(checkpoint_stack), PROMPTS[i], max_tokens=MAX_TOKENS[i], **settings[i], **extra
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, s in enumerate(settings):
        prompt = PROMPTS[i]
        processors = []
        stops = [*s.get("stop_token_ids", []), EOS] if "min_tokens" in s else []
        if "min_tokens" in s:
            processors.append(MinNewTokensLengthLogitsProcessor(len(prompt), s["min_tokens"], stops))
        if "repetition_penalty" in s:
            processors.append(RepetitionPenaltyLogitsProcessor(s["repetition_penalty"]))
        if "presence_penalty" in s or "frequency_penalty" in s:
            processors.append(
                PresenceFrequencyPenalty(
                    len(prompt), s.get("presence_penalty", 0), s.get("frequency_penalty", 0)
                )
            )
        expected = hf_generate(tiny_checkpoint, prompt, MAX_TOKENS[i], processors, stops)
        tokens, replies = results[i]
        assert tokens == expected, (i, s)
        if i:
            assert expected != plain[i], f"setting {i} changes nothing on this prompt"
        last = replies[-1]
        if i == 6:  # stopped by its stop token once min_tokens allowed it
            assert len(tokens) > s["min_tokens"] and last.finish_reason == FR.FINISH_REASON_STOP
            assert last.stop_reason.token_id == tokens[-1] in s["stop_token_ids"]
        else:
            assert last.finish_reason == FR.FINISH_REASON_LENGTH and not last.HasField("stop_reason")


def test_stop_tokens_and_strings_name_what_matched(checkpoint_stack):
    stub = gateway(checkpoint_stack)
    prompt = PROMPTS[2]  # greedy text "`/VV]]]]..." (byte tokenizer)
    plain, replies = generate(stub, prompt, max_tokens=20, ignore_eos=True)
    text = "".join(r.text for r in replies)
    stop_token = plain[2]
    cut = plain.index(stop_token)
    tokens, replies = generate(stub, prompt, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_token])
    last = replies[-1]
    assert tokens == plain[: cut + 1] and last.finish_reason == FR.FINISH_REASON_STOP
    assert last.stop_reason.token_id == stop_token
    kept = "".join(
        r.text
        for r in generate(
            stub,
            prompt,
            max_tokens=20,
            ignore_eos=True,
            stop_token_ids=[stop_token],
            include_stop_str_in_output=True,
        )[1]
    )
    assert len("".join(r.text for r in replies)) < len(kept) and text.startswith(kept)

    stop = text[2:5]
    at = text.index(stop)
    _, replies = generate(stub, prompt, max_tokens=20, ignore_eos=True, stop=[stop, "\x00never"])
    assert "".join(r.text for r in replies) == text[:at]
    assert replies[-1].stop_reason.text == stop and replies[-1].finish_reason == FR.FINISH_REASON_STOP
    _, replies = generate(
        stub, prompt, max_tokens=20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    assert "".join(r.text for r in replies) == text[: at + len(stop)]


def test_n_seeded_completions_are_distinct_reproducible_and_cancel_together(checkpoint_stack):
    stub = gateway(checkpoint_stack)

    def completions(**extra) -> tuple[dict[int, list[int]], list[gateway_pb2.GenerateResponse]]:
        sampling = common_pb2.SamplingParams(n=4, seed=1234, temperature=1.0, max_tokens=8, ignore_eos=True)
        request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPTS[0], sampling=sampling, **extra)
        replies = list(stub.Generate(request, timeout=300))
        out: dict[int, list[int]] = {}
        for r in replies:
            out.setdefault(r.index, []).extend(r.token_ids)
        return out, replies

    first, replies = completions(continuous_usage_stats=True)
    assert sorted(first) == [0, 1, 2, 3] and all(len(t) == 8 for t in first.values())
    assert len({tuple(t) for t in first.values()}) == 4
    assert all(r.HasField("usage") for r in replies)
    finals = [r for r in replies if r.finish_reason]
    assert sorted(r.index for r in finals) == [0, 1, 2, 3] and all(
        r.usage.completion_tokens == 8 for r in finals
    )
    assert completions()[0] == first
    sampling = common_pb2.SamplingParams(n=4, seed=1, temperature=1.0, max_tokens=250, ignore_eos=True)
    stream = stub.Generate(
        gateway_pb2.GenerateRequest(request_id="n-cancel", prompt_token_ids=[2, 70], sampling=sampling),
        timeout=120,
    )
    next(stream)
    # a request whose id is one of the completions' job ids is refused, naming the request that has it
    with pytest.raises(grpc.RpcError) as refused:
        list(
            stub.Generate(
                gateway_pb2.GenerateRequest(request_id="n-cancel-1", prompt_token_ids=[2, 5]), timeout=30
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'n-cancel-1', which request 'n-cancel' in flight is using" in refused.value.details()
    assert stub.Cancel(gateway_pb2.CancelRequest(request_id="n-cancel")).cancelled
    finals = [r for r in stream if r.finish_reason]
    assert sorted(r.index for r in finals) == [0, 1, 2, 3]
    assert all(r.finish_reason == FR.FINISH_REASON_CANCELLED for r in finals)
    dropped = stub.Generate(
        gateway_pb2.GenerateRequest(prompt_token_ids=[2, 71], sampling=sampling), timeout=120
    )
    next(dropped)
    dropped.cancel()  # the client goes away: all n jobs leave
    stats = drained_kv_stats(checkpoint_stack)
    assert stats.num_jobs == 0 and stats.free_gpu_blocks == stats.num_gpu_blocks


def test_openai_front_maps_sampling_fields_with_vllm_names(checkpoint_stack):
    import openai

    api = openai.OpenAI(base_url=checkpoint_stack.addresses["http"] + "/v1", api_key="unused", max_retries=0)
    stub = gateway(checkpoint_stack)
    prompt = PROMPTS[1]
    tokens, replies = generate(
        stub, prompt, max_tokens=6, ignore_eos=True, logprobs=3, repetition_penalty=1.3
    )
    expected = [lp for r in replies for lp in r.logprobs]
    reply = api.completions.create(
        model="tiny-opt",
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.3},
    )
    got = reply.choices[0].logprobs
    assert got.token_logprobs == pytest.approx([lp.logprob for lp in expected], abs=1e-6)
    # keyed by token text, as OpenAI's format is: tokens that decode alike (partial bytes) share a key
    assert all(1 <= len(top) <= 3 for top in got.top_logprobs) and len(got.top_logprobs) == 6

    chat = api.chat.completions.create(
        model="tiny-opt",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        n=2,
        seed=5,
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.5,
        logit_bias={"88": 5.0},
        extra_body={"ignore_eos": True, "min_p": 0.05},
    )
    assert sorted(c.index for c in chat.choices) == [0, 1] and chat.usage.completion_tokens == 8
    assert all(
        len(c.logprobs.content) == 4 and len(c.logprobs.content[0].top_logprobs) == 2 for c in chat.choices
    )

    plain, _ = generate(stub, prompt, max_tokens=6, ignore_eos=True)
    stop = api.completions.create(
        model="tiny-opt",
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        extra_body={"stop_token_ids": [plain[1]]},
    )
    assert stop.choices[0].finish_reason == "stop" and stop.choices[0].model_extra["stop_reason"] == plain[1]
    with pytest.raises(openai.BadRequestError, match="--max-logprobs"):
        api.completions.create(model="tiny-opt", prompt=prompt, max_tokens=2, logprobs=21)

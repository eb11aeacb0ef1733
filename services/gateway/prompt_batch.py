"""/v1/completions beyond one prompt and plain generation: several prompts per request, echo, scoring.

Each prompt of a request is a request of its own to `Generations` (its own jobs, so the scheduler
sees and preempts each one), with the id ``{id}-{k}`` when there are several; its completions
are renumbered ``k * n + i`` as OpenAI numbers them, and the streams merge into one, so closing
it (the client went away, or cancelled) ends every prompt's jobs.

Echo puts each prompt in front of its completions: its text, and with `logprobs` its tokens'
logprobs (the first token has none: a position whose `rank` is 0 means "no logprob"). A prompt's
logprobs are computed once, by its first completion; the others of the same prompt wait for them.
`max_tokens: 0` (allowed with echo: score the prompt only) runs one step and drops its token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastserve.v1 import common_pb2
from fastserve.v1 import gateway_pb2 as pb

from .generation import Generations, Prepared, merge
from .validation import InvalidRequest


@dataclass
class PromptBatch:
    """A completions request's prompts, validated: one `Prepared` per prompt."""

    jobs: list[Prepared]
    texts: list[str | None]  # each prompt as the client sent it when it was text (echoed as is)
    n: int
    echo: bool = False
    echo_logprobs: bool = False  # echo with logprobs: the prompt's logprobs lead each choice's
    score_only: bool = False  # max_tokens 0: the generated token is dropped
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs field on each choice
    waiting: dict[int, list[pb.GenerateResponse]] = field(default_factory=dict)


def split_prompts(prompt, limit: int) -> list[str | list[int]]:
    """The request's prompts: a string, a token-id list, or a list of either (at most `limit`)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts or any(not p for p in prompts):
        raise InvalidRequest("prompt: must not be empty")
    if len(prompts) > limit:
        raise InvalidRequest(
            f"prompt: {len(prompts)} prompts exceeds the limit of {limit} per request (--max-prompts-per-request)"
        )
    return prompts


def request_ids(base: str, count: int) -> list[str]:
    """Prompt k's request id: the client's id for a single prompt, else '{id}-{k}'."""
    return [base] if count == 1 else [f"{base}-{k}" for k in range(count)]


async def stream(
    generations: Generations, batch: PromptBatch, operation: str
) -> AsyncIterator[pb.GenerateResponse]:
    """Every prompt's completions as one stream, renumbered, with echo and scoring applied."""
    n = batch.n
    streams = [_renumbered(generations.stream(job, operation), k * n) for k, job in enumerate(batch.jobs)]
    started: set[int] = set()
    prompt_lps: dict[int, list[common_pb2.PositionLogprobs]] = {}  # by prompt, from its first completion
    needs_lps = batch.echo_logprobs or batch.prompt_logprobs
    replies = merge(streams)
    try:
        async for reply in replies:
            k = reply.index // n
            if reply.index in started:
                yield _scored(batch, reply)
                continue
            if needs_lps and k not in prompt_lps:
                if reply.index % n:  # another completion of this prompt carries its logprobs
                    batch.waiting.setdefault(k, []).append(reply)
                    continue
                prompt_lps[k] = list(reply.prompt_logprobs)
            started.add(reply.index)
            yield _first(generations, batch, reply, prompt_lps.get(k, []))
            for held in batch.waiting.pop(k, []) if reply.index % n == 0 else []:
                if held.index in started:
                    yield _scored(batch, held)
                else:
                    started.add(held.index)
                    yield _first(generations, batch, held, prompt_lps[k])
    finally:
        await replies.aclose()


async def _renumbered(
    replies: AsyncIterator[pb.GenerateResponse], offset: int
) -> AsyncIterator[pb.GenerateResponse]:
    try:
        async for reply in replies:
            if offset:
                reply.index += offset
            yield reply
    finally:
        await replies.aclose()


def _scored(batch: PromptBatch, reply: pb.GenerateResponse) -> pb.GenerateResponse:
    """A score-only request's step: its token and text dropped, the finish reported as 'length'."""
    if not batch.score_only:
        return reply
    del reply.token_ids[:], reply.logprobs[:]
    reply.text = ""
    reply.usage.completion_tokens = 0
    if reply.finish_reason and reply.finish_reason != common_pb2.FINISH_REASON_ERROR:
        reply.finish_reason = common_pb2.FINISH_REASON_LENGTH
        reply.ClearField("stop_reason")
    return reply


def _first(
    generations: Generations, batch: PromptBatch, reply: pb.GenerateResponse, prompt_lps: list
) -> pb.GenerateResponse:
    """A completion's first message: its prompt's logprobs, and with echo the prompt in front."""
    reply = _scored(batch, reply)
    if batch.prompt_logprobs and not reply.prompt_logprobs:
        reply.prompt_logprobs.extend(prompt_lps)
    if not batch.echo:
        return reply
    job = batch.jobs[reply.index // batch.n]
    text = batch.texts[reply.index // batch.n]
    echo = text if text is not None else generations.tokenizer.decode(job.prompt_ids)
    reply.text = echo + reply.text
    if batch.echo_logprobs:
        positions = [common_pb2.PositionLogprobs(token_id=job.prompt_ids[0], rank=0), *prompt_lps]
        generated = list(reply.logprobs)
        del reply.logprobs[:]
        reply.logprobs.extend(positions + generated)
    return reply

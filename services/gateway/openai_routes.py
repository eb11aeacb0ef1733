"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

They use the same `Generations` as the gRPC server (validation, tokenizer, scheduler
stream), so a request gets the same tokens and the same error messages over either transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fastserve.v1 import gateway_pb2 as pb

from . import metrics, prompt_batch
from .admission import Overloaded
from .api_keys import ApiKeys
from .chat import chat_prompt_ids
from .extra_routes import model_card
from .generation import Generations, Prepared, SchedulerUnavailable
from .http_errors import error, error_body, invalid, overloaded
from .http_limits import BoundedStream
from .openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingBody,
    to_generate_request,
)
from .openai_shapes import FINISH, FR, ChatShape, Choice, CompletionShape, usage
from .prompt_batch import PromptBatch, request_ids, split_prompts
from .validation import InvalidRequest


class GenerationFailed(Exception):
    """The server failed the request after accepting it (FINISH_REASON_ERROR)."""


def routes(
    generations: Generations,
    served_model_name: str,
    keys: ApiKeys,
    serving: Callable[[], bool],
    stream_send_timeout: float,
) -> APIRouter:
    router = APIRouter()
    created = int(time.time())

    @router.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if serving() else 503)

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(generations, served_model_name, created)]}

    def check_model(body: SamplingBody) -> JSONResponse | None:
        if body.model not in (None, served_model_name):
            return error(404, f"The model `{body.model}` does not exist.", "model")
        if not serving():
            return error(503, "the server is not serving (its scheduler is not ready)")
        return None

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        def build() -> list[pb.GenerateRequest]:
            prompts = split_prompts(body.prompt, generations.limits.max_prompts_per_request)
            score_only = body.echo and body.max_tokens == 0  # vLLM: score the prompt, generate nothing
            base = request_id(request) or (uuid.uuid4().hex if len(prompts) > 1 else "")
            built = []
            for prompt, rid in zip(prompts, request_ids(base, len(prompts)), strict=True):
                generate = to_generate_request(body, prompt, 1 if score_only else body.max_tokens, rid)
                if body.echo and body.logprobs is not None:  # the prompt's logprobs lead the choice's
                    generate.sampling.prompt_logprobs = max(body.logprobs, body.prompt_logprobs or 0)
                built.append(generate)
            return built

        def batch(jobs: list[Prepared]) -> PromptBatch:
            prompts = split_prompts(body.prompt, generations.limits.max_prompts_per_request)
            return PromptBatch(
                jobs,
                [p if isinstance(p, str) else None for p in prompts],
                jobs[0].sampling.n,
                echo=body.echo,
                echo_logprobs=body.echo and body.logprobs is not None,
                score_only=body.echo and body.max_tokens == 0,
                prompt_logprobs=body.prompt_logprobs is not None,
            )

        return await generate(body, request, build, CompletionShape, "cmpl", batch)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        def build() -> pb.GenerateRequest:
            prompt = chat_prompt_ids(
                generations.tokenizer,
                [(m.role, m.text()) for m in body.messages],
                body.add_generation_prompt,
            )
            max_tokens = body.max_tokens_sent()
            if max_tokens is None:  # OpenAI's chat default: as many as fit
                limits = generations.limits
                max_tokens = max(1, min(limits.max_tokens_limit, limits.max_model_len - len(prompt)))
            return [to_generate_request(body, prompt, max_tokens, request_id(request))]

        def batch(jobs: list[Prepared]) -> PromptBatch:
            return PromptBatch(
                jobs, [None], jobs[0].sampling.n, prompt_logprobs=body.prompt_logprobs is not None
            )

        return await generate(body, request, build, ChatShape, "chatcmpl", batch)

    async def generate(
        body: SamplingBody,
        request: Request,
        build: Callable[[], list[pb.GenerateRequest]],
        shape_of,
        prefix: str,
        batch_of: Callable[[list[Prepared]], PromptBatch],
    ) -> Response:
        """Size checks, admission, then the work (tokenizing in `build`, validation, the stream)."""
        refused = check_model(body)
        if refused:
            return refused
        try:
            body.check_sizes(generations.limits)
            ticket = generations.admission.admit()
        except InvalidRequest as exc:
            return invalid(exc)
        except Overloaded as exc:
            return overloaded(exc)
        owner = keys.owner(request.headers.get("authorization", ""))
        jobs: list[Prepared] = []
        try:  # each prompt is a request of its own: the first takes the ticket admitted above
            for k, generate in enumerate(build()):
                jobs.append(generations.prepare(generate, owner, None if k else ticket))
        except (InvalidRequest, Overloaded) as exc:
            ticket.close()
            for job in jobs:
                job.ticket.close()
            return invalid(exc) if isinstance(exc, InvalidRequest) else overloaded(exc)
        except BaseException:
            ticket.close()
            for job in jobs:
                job.ticket.close()
            raise
        batch = batch_of(jobs)
        base = jobs[0].request_id if len(jobs) == 1 else jobs[0].request_id.rsplit("-", 1)[0]
        shape = shape_of(f"{prefix}-{base}", served_model_name, generations.tokenizer)
        return await respond(generations, batch, body, shape, request, stream_send_timeout)

    return router


def request_id(request: Request) -> str:
    return request.headers.get("x-request-id", "")


async def respond(
    generations: Generations,
    batch: PromptBatch,
    body: SamplingBody,
    shape,
    request: Request,
    send_timeout: float,
) -> Response:
    shape.n, shape.prompt_logprobs_asked = batch.n, batch.prompt_logprobs

    def close_tickets() -> None:
        for job in batch.jobs:
            job.ticket.close()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return BoundedStream(
            sse(prompt_batch.stream(generations, batch, shape.operation), shape, include_usage),
            send_timeout=send_timeout,
            on_close=close_tickets,  # also when the stream never started (the client left first)
            on_stall=metrics.STALLED.inc,
            media_type="text/event-stream",
        )
    collect = asyncio.ensure_future(collect_all(prompt_batch.stream(generations, batch, shape.operation)))
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait([collect, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        close_tickets()  # (the streams close them; this is for a task cancelled before it ran)
    if not collect.done():  # the client went away: closing the stream cancels the job
        collect.cancel()
        await asyncio.gather(collect, return_exceptions=True)
        return Response(status_code=499)
    gone.cancel()
    try:
        choices = collect.result()
    except InvalidRequest as exc:
        return invalid(exc)
    except SchedulerUnavailable as exc:
        return error(503, str(exc))
    except GenerationFailed as exc:
        return error(500, str(exc))
    return JSONResponse(shape.whole(choices))


async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_all(stream: AsyncIterator[pb.GenerateResponse]) -> list[Choice]:
    choices: dict[int, Choice] = {}
    async for reply in stream:
        choice = choices.setdefault(reply.index, Choice(reply.index))
        choice.text.append(reply.text)
        choice.logprobs.extend(reply.logprobs)
        choice.prompt_logprobs.extend(reply.prompt_logprobs)
        choice.last = reply
        if reply.finish_reason == FR.FINISH_REASON_ERROR:
            raise GenerationFailed(reply.error or "the request failed")
    return [choices[i] for i in sorted(choices)]


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def sse(stream: AsyncIterator[pb.GenerateResponse], shape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; an error after the stream began is an `error` event, then [DONE]. Closing
    this closes `stream` at once (which cancels the request's jobs)."""
    async with contextlib.aclosing(stream):
        try:
            started: set[int] = set()  # completions that sent their first chunk
            finals: list[pb.GenerateResponse] = []
            async for reply in stream:
                first = reply.index not in started
                if reply.finish_reason == FR.FINISH_REASON_ERROR:
                    if reply.text:
                        yield event(shape.chunk(reply, None, first))
                    yield event(error_body(500, reply.error))
                    break
                reason = FINISH.get(reply.finish_reason)
                # vLLM's rule: every step that produced tokens is a chunk, even when its text is
                # held back (an incomplete UTF-8 byte, a possible stop-string prefix)
                if reply.text or reply.token_ids or reply.logprobs or reason or (first and shape.role_first):
                    yield event(shape.chunk(reply, reason, first))
                    started.add(reply.index)
                if reason:
                    finals.append(reply)
            if include_usage and finals:
                yield event(shape.usage_chunk(usage(finals, shape.n)))
        except InvalidRequest as exc:
            yield event(error_body(400, str(exc)))
        except SchedulerUnavailable as exc:
            yield event(error_body(503, str(exc)))
        yield "data: [DONE]\n\n"

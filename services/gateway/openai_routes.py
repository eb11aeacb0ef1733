"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

They use the same `Generations` as the gRPC server (validation, tokenizer, scheduler
stream), so a request gets the same tokens and the same error messages over either transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fastserve.v1 import gateway_pb2 as pb

from . import metrics
from .admission import Overloaded
from .api_keys import ApiKeys
from .chat import chat_prompt_ids
from .generation import Generations, Prepared, SchedulerUnavailable
from .http_errors import ERROR_TYPES, error, invalid
from .http_limits import BoundedStream
from .openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingBody,
    single_prompt,
    to_generate_request,
)
from .openai_shapes import FINISH, FR, ChatShape, Choice, CompletionShape, usage
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
        return {
            "object": "list",
            "data": [
                {
                    "id": served_model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "fastserve",
                    "root": generations.info.model,
                    "max_model_len": generations.limits.max_model_len,
                }
            ],
        }

    def check_model(body: SamplingBody) -> JSONResponse | None:
        if body.model not in (None, served_model_name):
            return error(404, f"The model `{body.model}` does not exist.", "model")
        if not serving():
            return error(503, "the server is not serving (its scheduler is not ready)")
        return None

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        def build() -> pb.GenerateRequest:
            return to_generate_request(body, single_prompt(body.prompt), body.max_tokens, request_id(request))

        return await generate(body, request, build, CompletionShape, "cmpl")

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
            return to_generate_request(body, prompt, max_tokens, request_id(request))

        return await generate(body, request, build, ChatShape, "chatcmpl")

    async def generate(
        body: SamplingBody, request: Request, build: Callable[[], pb.GenerateRequest], shape_of, prefix: str
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
        try:
            job = generations.prepare(build(), keys.owner(request.headers.get("authorization", "")), ticket)
        except InvalidRequest as exc:
            ticket.close()
            return invalid(exc)
        except BaseException:
            ticket.close()
            raise
        shape = shape_of(f"{prefix}-{job.request_id}", served_model_name, generations.tokenizer)
        return await respond(generations, job, body, shape, request, stream_send_timeout)

    return router


def request_id(request: Request) -> str:
    return request.headers.get("x-request-id", "")


def overloaded(exc: Overloaded) -> JSONResponse:
    return error(429, str(exc), headers={"retry-after": str(exc.retry_after)})


async def respond(
    generations: Generations, job: Prepared, body: SamplingBody, shape, request: Request, send_timeout: float
) -> Response:
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return BoundedStream(
            sse(generations.stream(job, shape.operation), shape, include_usage),
            send_timeout=send_timeout,
            on_close=job.ticket.close,  # also when the stream never started (the client left first)
            on_stall=metrics.STALLED.inc,
            media_type="text/event-stream",
        )
    collect = asyncio.ensure_future(collect_all(generations.stream(job, shape.operation)))
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait([collect, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        job.ticket.close()  # (the stream closes it; this is for a task cancelled before it ran)
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
                    yield event(
                        {
                            "error": {
                                "message": reply.error,
                                "type": ERROR_TYPES[500],
                                "param": None,
                                "code": 500,
                            }
                        }
                    )
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
                yield event(shape.usage_chunk(usage(finals)))
        except InvalidRequest as exc:
            yield event(
                {"error": {"message": str(exc), "type": ERROR_TYPES[400], "param": None, "code": 400}}
            )
        except SchedulerUnavailable as exc:
            yield event(
                {"error": {"message": str(exc), "type": ERROR_TYPES[503], "param": None, "code": 503}}
            )
        yield "data: [DONE]\n\n"

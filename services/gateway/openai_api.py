"""The OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

It runs in the gateway process on the same event loop as the gRPC server and uses
the same `Generations` (validation, tokenizer, scheduler stream), so a request gets
the same tokens and the same error messages over either transport. Errors use
OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fastserve.v1 import common_pb2
from fastserve.v1 import gateway_pb2 as pb

from .api_keys import ApiKeys
from .chat import chat_prompt_ids
from .generation import Generations, SchedulerUnavailable
from .openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingBody,
    single_prompt,
    to_generate_request,
)
from .validation import InvalidRequest

log = logging.getLogger("fastserve.gateway.http")
FR = common_pb2.FinishReason
FINISH = {  # FastServe's finish reasons as OpenAI / vLLM name them
    FR.FINISH_REASON_STOP: "stop",
    FR.FINISH_REASON_LENGTH: "length",
    FR.FINISH_REASON_CANCELLED: "abort",
}
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES[status], "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def invalid(exc: InvalidRequest) -> JSONResponse:
    """400 with the shared validation message; `param` is the field it names."""
    text = str(exc)
    return error(400, text, text.split(":", 1)[0] if ":" in text else None)


class GenerationFailed(Exception):
    """The server failed the request after accepting it (FINISH_REASON_ERROR)."""


def create_app(
    generations: Generations,
    served_model_name: str,
    keys: ApiKeys,
    serving: Callable[[], bool],
) -> FastAPI:
    app = FastAPI(title="FastServe", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:  # noqa: ARG001
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body")
        return error(400, f"{field or 'body'}: {first['msg']}", field or None)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if not keys.allows(request.headers.get("authorization", "")):
                return error(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if serving() else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        refused = check_model(body)
        if refused:
            return refused
        try:
            generate = to_generate_request(
                body, single_prompt(body.prompt), body.max_tokens, request.headers.get("x-request-id", "")
            )
            job = generations.prepare(generate, keys.owner(request.headers.get("authorization", "")))
        except InvalidRequest as exc:
            return invalid(exc)
        shape = CompletionShape(f"cmpl-{job.request_id}", served_model_name, generations.tokenizer)
        return await respond(generations, job, body, shape, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        refused = check_model(body)
        if refused:
            return refused
        try:
            prompt = chat_prompt_ids(
                generations.tokenizer,
                [(m.role, m.text()) for m in body.messages],
                body.add_generation_prompt,
            )
            max_tokens = (
                body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            )
            if max_tokens is None:  # OpenAI's chat default: as many as fit
                limits = generations.limits
                max_tokens = max(1, min(limits.max_tokens_limit, limits.max_model_len - len(prompt)))
            generate = to_generate_request(body, prompt, max_tokens, request.headers.get("x-request-id", ""))
            job = generations.prepare(generate, keys.owner(request.headers.get("authorization", "")))
        except InvalidRequest as exc:
            return invalid(exc)
        shape = ChatShape(f"chatcmpl-{job.request_id}", served_model_name, generations.tokenizer)
        return await respond(generations, job, body, shape, request)

    return app


async def respond(generations: Generations, job, body: SamplingBody, shape, request: Request) -> Response:
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            sse(generations.stream(job, shape.operation), shape, include_usage),
            media_type="text/event-stream",
        )
    collect = asyncio.ensure_future(collect_all(generations.stream(job, shape.operation)))
    gone = asyncio.ensure_future(wait_disconnect(request))
    await asyncio.wait([collect, gone], return_when=asyncio.FIRST_COMPLETED)
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


class Choice:
    """One completion of a request, gathered from its messages (those with its `index`)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.logprobs: list[common_pb2.PositionLogprobs] = []
        self.last = pb.GenerateResponse()


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


def usage(replies: list[pb.GenerateResponse]) -> dict[str, int]:
    """Token counts over the request's completions (each completion's final message counts it)."""
    prompt = replies[0].usage.prompt_tokens if replies else 0
    completion = sum(r.usage.completion_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stop_reason(reply: pb.GenerateResponse) -> int | str | None:
    """vLLM's stop_reason: the stop string or stop token id that ended the completion (None for EOS)."""
    kind = reply.stop_reason.WhichOneof("kind")
    return (
        reply.stop_reason.text
        if kind == "text"
        else reply.stop_reason.token_id
        if kind == "token_id"
        else None
    )


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def sse(stream: AsyncIterator[pb.GenerateResponse], shape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; an error after the stream began is an `error` event, then [DONE]."""
    try:
        started: set[int] = set()  # completions that sent their first chunk
        finals: list[pb.GenerateResponse] = []
        async for reply in stream:
            first = reply.index not in started
            if reply.finish_reason == FR.FINISH_REASON_ERROR:
                if reply.text:
                    yield event(shape.chunk(reply, None, first))
                yield event(
                    {"error": {"message": reply.error, "type": ERROR_TYPES[500], "param": None, "code": 500}}
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
        yield event({"error": {"message": str(exc), "type": ERROR_TYPES[400], "param": None, "code": 400}})
    except SchedulerUnavailable as exc:
        yield event({"error": {"message": str(exc), "type": ERROR_TYPES[503], "param": None, "code": 503}})
    yield "data: [DONE]\n\n"


class CompletionShape:
    operation = "text_completion"
    role_first = False  # chat streams open with a chunk that names the role

    def __init__(self, response_id: str, model: str, tokenizer) -> None:
        self.id, self.model, self.created = response_id, model, int(time.time())
        self.tokenizer = tokenizer

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def logprobs(self, positions: list[common_pb2.PositionLogprobs], asked: bool) -> dict[str, Any] | None:
        """The completions API's logprobs object (None when not asked for)."""
        if not asked:
            return None
        tokens = [self.token(p.token_id) for p in positions]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [p.logprob for p in positions],
            "top_logprobs": [{self.token(t.token_id): t.logprob for t in p.top} for p in positions],
            "text_offset": offsets,
        }

    def whole(self, choices: list[Choice]) -> dict[str, Any]:
        return {
            **self._head("text_completion"),
            "choices": [
                {
                    "index": c.index,
                    "text": "".join(c.text),
                    "logprobs": self.logprobs(c.logprobs, bool(c.logprobs)),
                    "finish_reason": FINISH.get(c.last.finish_reason),
                    "stop_reason": stop_reason(c.last),
                }
                for c in choices
            ],
            "usage": usage([c.last for c in choices]),
        }

    def chunk(self, reply: pb.GenerateResponse, reason: str | None, first: bool) -> dict[str, Any]:  # noqa: ARG002
        choice = {
            "index": reply.index,
            "text": reply.text,
            "logprobs": self.logprobs(list(reply.logprobs), bool(reply.logprobs)),
            "finish_reason": reason,
            "stop_reason": stop_reason(reply) if reason else None,
        }
        return {**self._head("text_completion"), "choices": [choice], "usage": None}

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        return {**self._head("text_completion"), "choices": [], "usage": counts}


class ChatShape(CompletionShape):
    operation = "chat"
    role_first = True

    def logprobs(self, positions: list[common_pb2.PositionLogprobs], asked: bool) -> dict[str, Any] | None:
        """The chat API's logprobs object: `content`, one entry per token."""
        if not asked:
            return None

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {
                    **entry(p.token_id, p.logprob),
                    "top_logprobs": [entry(t.token_id, t.logprob) for t in p.top],
                }
                for p in positions
            ]
        }

    def whole(self, choices: list[Choice]) -> dict[str, Any]:
        return {
            **self._head("chat.completion"),
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": self.logprobs(c.logprobs, bool(c.logprobs)),
                    "finish_reason": FINISH.get(c.last.finish_reason),
                    "stop_reason": stop_reason(c.last),
                }
                for c in choices
            ],
            "usage": usage([c.last for c in choices]),
        }

    def chunk(self, reply: pb.GenerateResponse, reason: str | None, first: bool) -> dict[str, Any]:
        delta = {"role": "assistant", "content": reply.text} if first else {"content": reply.text}
        choice = {
            "index": reply.index,
            "delta": delta,
            "logprobs": self.logprobs(list(reply.logprobs), bool(reply.logprobs)),
            "finish_reason": reason,
            "stop_reason": stop_reason(reply) if reason else None,
        }
        return {**self._head("chat.completion.chunk"), "choices": [choice], "usage": None}

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": counts}

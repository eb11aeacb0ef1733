"""vLLM's routes beside the OpenAI ones: /tokenize, /detokenize, /tokenizer_info, /version, /ping,
/v1/models/{id}, with vLLM's request and response shapes. They use the gateway's tokenizer, the
one every request is tokenized with, so a client counting tokens gets the server's count."""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from .chat import chat_prompt_ids
from .generation import Generations
from .http_errors import error, invalid
from .openai_protocol import ChatMessage
from .validation import InvalidRequest, check_prompt_chars, check_token


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeRequest: a `prompt`, or chat `messages` rendered with the chat template."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """The tokens of `text`, with or without the specials the tokenizer adds (OPT's BOS)."""
    inner = getattr(tokenizer, "inner", None)
    if inner is not None:
        return [int(t) for t in inner.encode(text, add_special_tokens=add_special_tokens)]
    ids = tokenizer.encode(text)
    return ids if add_special_tokens else ids[1:]  # the byte tokenizer: BOS, then the bytes


def model_card(generations: Generations, served_model_name: str, created: int) -> dict[str, Any]:
    return {
        "id": served_model_name,
        "object": "model",
        "created": created,
        "owned_by": "fastserve",
        "root": generations.info.model,
        "max_model_len": generations.limits.max_model_len,
    }


def fastserve_version() -> str:
    try:
        return metadata.version("fastserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def extra_routes(
    generations: Generations, served_model_name: str, serving: Callable[[], bool], created: int
) -> APIRouter:
    router = APIRouter()
    tokenizer = generations.tokenizer

    def wrong_model(model: str | None) -> JSONResponse | None:
        if model not in (None, served_model_name):
            return error(404, f"The model `{model}` does not exist.", "model")
        return None

    @router.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return Response(status_code=200 if serving() else 503)

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": fastserve_version()}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != served_model_name:
            return error(404, f"The model `{model_id}` does not exist.", "model")
        return JSONResponse(model_card(generations, served_model_name, created))

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        if refused := wrong_model(body.model):
            return refused
        if (body.prompt is None) == (body.messages is None):
            return error(400, "prompt / messages: give exactly one of them", "prompt")
        try:
            if body.prompt is not None:
                check_prompt_chars("prompt", len(body.prompt), generations.limits)
                ids = encode(tokenizer, body.prompt, body.add_special_tokens)
            else:
                messages = [(m.role, m.text()) for m in body.messages or []]
                check_prompt_chars("messages", sum(len(text) for _, text in messages), generations.limits)
                ids = chat_prompt_ids(tokenizer, messages, body.add_generation_prompt)
        except InvalidRequest as exc:
            return invalid(exc)
        return JSONResponse(
            {
                "count": len(ids),
                "max_model_len": generations.limits.max_model_len,
                "tokens": ids,
                "token_strs": [tokenizer.decode([t]) for t in ids] if body.return_token_strs else None,
            }
        )

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        if refused := wrong_model(body.model):
            return refused
        try:
            for i, token in enumerate(body.tokens):
                check_token(f"tokens[{i}]", token, generations.limits)
        except InvalidRequest as exc:
            return invalid(exc)
        return JSONResponse({"prompt": tokenizer.decode(body.tokens)})

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        inner = getattr(tokenizer, "inner", None)
        if inner is None:  # the byte tokenizer
            return {
                "tokenizer_class": "ByteTokenizer",
                "bos_token": "</s>",
                "eos_token": "</s>",
                "eos_token_id": tokenizer.eos_token_id,
                "vocab_size": generations.limits.vocab_size,
                "model_max_length": generations.limits.max_model_len,
            }
        info = {
            "tokenizer_class": type(inner).__name__,
            "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": len(inner),
            "model_max_length": generations.limits.max_model_len,
            "chat_template": getattr(inner, "chat_template", None),
        }
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(inner, name, None)
            info[name] = str(value) if value is not None else None
        return info

    return router

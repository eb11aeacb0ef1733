"""OpenAI's response bodies and stream chunks for completions and chat completions."""

from __future__ import annotations

import time
from typing import Any

from fastserve.v1 import common_pb2
from fastserve.v1 import gateway_pb2 as pb

FR = common_pb2.FinishReason
FINISH = {  # FastServe's finish reasons as OpenAI / vLLM name them
    FR.FINISH_REASON_STOP: "stop",
    FR.FINISH_REASON_LENGTH: "length",
    FR.FINISH_REASON_CANCELLED: "abort",
}


class Choice:
    """One completion of a request, gathered from its messages (those with its `index`)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.logprobs: list[common_pb2.PositionLogprobs] = []
        self.last = pb.GenerateResponse()


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

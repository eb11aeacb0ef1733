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
        self.prompt_logprobs: list[common_pb2.PositionLogprobs] = []  # prompt positions 1..
        self.last = pb.GenerateResponse()


def usage(replies: list[pb.GenerateResponse], n: int = 1) -> dict[str, int]:
    """Token counts over the request's completions (each completion's final message counts it);
    each prompt counts once (its completions are numbered prompt_index * n + i)."""
    prompt = sum(r.usage.prompt_tokens for r in replies if r.index % n == 0)
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
        self.n = 1  # completions per prompt
        self.prompt_logprobs_asked = False  # vLLM's prompt_logprobs field on the response

    def vllm_prompt_logprobs(self, positions: list[common_pb2.PositionLogprobs]) -> list | None:
        """vLLM's `prompt_logprobs`: None for the first prompt token, then for each position its token
        and the top alternatives, by token id: {"logprob", "rank", "decoded_token"}."""
        if not self.prompt_logprobs_asked:
            return None

        def entry(token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
            return {"logprob": logprob, "rank": rank, "decoded_token": self.token(token_id)}

        out: list[dict[str, Any] | None] = [None]
        for p in positions:
            alternatives = {str(t.token_id): entry(t.token_id, t.logprob, r) for r, t in enumerate(p.top, 1)}
            alternatives[str(p.token_id)] = entry(p.token_id, p.logprob, p.rank)
            out.append(alternatives)
        return out

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
        # rank 0: a position with no logprob (an echoed prompt's first token); the chosen token is
        # listed among the alternatives, as OpenAI and vLLM do
        return {
            "tokens": tokens,
            "token_logprobs": [p.logprob if p.rank else None for p in positions],
            "top_logprobs": [
                {**{self.token(t.token_id): t.logprob for t in p.top}, self.token(p.token_id): p.logprob}
                if p.rank
                else None
                for p in positions
            ],
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
                    "prompt_logprobs": self.vllm_prompt_logprobs(c.prompt_logprobs),
                }
                for c in choices
            ],
            "usage": usage([c.last for c in choices], self.n),
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
            "usage": usage([c.last for c in choices], self.n),
            "prompt_logprobs": self.vllm_prompt_logprobs(choices[0].prompt_logprobs if choices else []),
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

"""Chat messages to prompt token ids: the tokenizer's chat template, or FastServe's default.

OPT checkpoints ship no chat template. The default renders each message as
`<role>: <content>` on its own line and ends with `assistant:` when a reply is wanted:

    system: You are terse.
    user: Hi!
    assistant:
"""

from __future__ import annotations

from fastserve.tokenizer import Tokenizer


def default_template(messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    lines = [f"{role}: {content}" for role, content in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)


def chat_prompt_ids(
    tokenizer: Tokenizer, messages: list[tuple[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """(role, content) pairs rendered and tokenized."""
    inner = getattr(tokenizer, "inner", None)  # a Hugging Face tokenizer
    if inner is not None and getattr(inner, "chat_template", None):
        ids = inner.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return tokenizer.encode(default_template(messages, add_generation_prompt))

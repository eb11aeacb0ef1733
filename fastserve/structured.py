"""Structured outputs: a `StructuredOutputs` message as an xgrammar grammar.

The gateway parses every constraint here before it accepts a request (a bad schema, regex
or grammar is an INVALID_ARGUMENT that names the field), and the worker compiles the same
grammar against the model's vocabulary. Both meet only through this function, so what the
gateway accepted is what the worker can compile.

JSON is generated without optional whitespace (vLLM's `disable_any_whitespace`): a weak or
random-weight model would otherwise spend its tokens on blanks between the fields.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from fastserve.v1 import common_pb2

JSON_OBJECT_SCHEMA = '{"type": "object"}'
# xgrammar 0.2's string characters let in UTF-8-encoded surrogates (U+D800-U+DFFF, not valid
# UTF-8), and its rule for a string with minLength / maxLength raw control characters too: JSON
# forbids both, json.loads refuses them. Its converted grammar is patched to this class.
LENIENT_STRING_CHARS = (r"[^\0-\x1f\"\\\r\n]", r"[^\"\\\r\n]")
STRICT_STRING_CHAR = r"[^\0-\x1f\"\\\uD800-\uDFFF]"
CACHE_SIZE = 256  # distinct constraints remembered: parsed by the gateway, compiled by a worker


class InvalidConstraint(ValueError):
    """The constraint does not parse; the message starts with the field it names."""


def key(spec: common_pb2.StructuredOutputs) -> tuple[str, str]:
    """(kind, text): what identifies a compiled grammar (the cache key)."""
    kind = spec.WhichOneof("kind")
    if kind == "choice":
        return kind, json.dumps(list(spec.choice.choices))
    if kind == "json_object":
        return kind, ""
    return kind, getattr(spec, kind)


def grammar(kind: str, text: str):
    """The xgrammar `Grammar` for (kind, text) as `key` gives them; InvalidConstraint when it does not parse."""
    import xgrammar as xgr

    field = f"sampling.structured_outputs.{kind}"
    try:
        if kind in ("json", "json_object"):
            schema = text if kind == "json" else JSON_OBJECT_SCHEMA
            json.loads(schema)
            converted = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
            for lenient in LENIENT_STRING_CHARS:
                converted = converted.replace(lenient, STRICT_STRING_CHAR)
            return xgr.Grammar.from_ebnf(converted)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "choice":
            choices = json.loads(text)
            if not choices or not all(choices):
                raise InvalidConstraint(f"{field}: give at least one choice, none of them empty")
            return xgr.Grammar.from_ebnf(
                "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
            )
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(text)
    except InvalidConstraint:
        raise
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError on bad input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", first)  # xgrammar's '[time] file.cc:94: '
        raise InvalidConstraint(f"{field}: does not parse: {first[:300]}") from None
    raise InvalidConstraint(f"sampling.structured_outputs: unknown kind {kind!r}")


def check(spec: common_pb2.StructuredOutputs) -> None:
    """InvalidConstraint when the constraint is empty or does not parse."""
    if spec.WhichOneof("kind") is None:
        raise InvalidConstraint(
            "sampling.structured_outputs: set one of json, json_object, regex, choice, grammar"
        )
    _parses(*key(spec))


@lru_cache(maxsize=CACHE_SIZE)
def _parses(kind: str, text: str) -> bool:
    """`grammar` remembered for the constraints that parse (a client repeats its schema)."""
    grammar(kind, text)
    return True

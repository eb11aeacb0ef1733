"""Structured outputs: constraints parse at the gateway, and the worker's sampler keeps a job's
output inside its grammar, also when its state is rebuilt from the tokens so far (recompute)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from fastserve import structured
from fastserve.model_spec import resolve_model
from fastserve.services.worker.runner import ModelRunner, SeqWork
from fastserve.services.worker.sampling import SamplingParams
from fastserve.services.worker.structured import Grammars
from fastserve.tokenizer import ByteTokenizer
from fastserve.v1 import common_pb2

SCHEMA = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 999},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["age", "color", "tags"],
    "additionalProperties": False,
}
BLOCK = 16


def spec_of(**kind) -> common_pb2.StructuredOutputs:
    return common_pb2.StructuredOutputs(**kind)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (spec_of(json="{not json"), "sampling.structured_outputs.json: does not parse"),
        (spec_of(json='{"type": 5}'), "sampling.structured_outputs.json: does not parse"),
        (spec_of(regex="(["), "sampling.structured_outputs.regex: does not parse"),
        (spec_of(grammar="root ::= foo"), "sampling.structured_outputs.grammar: does not parse"),
        (spec_of(choice=common_pb2.Choices(choices=[])), "at least one choice"),
        (spec_of(), "set one of json"),
    ],
)
def test_bad_constraints_are_refused_naming_the_field(spec, message):
    with pytest.raises(structured.InvalidConstraint, match=message.replace("(", r"\(")):
        structured.check(spec)


def generate(
    runner: ModelRunner,
    rid: str,
    prompt: list[int],
    sampling: SamplingParams,
    steps: int,
    start: list[int] | None = None,
) -> list[int]:
    """Runs one job alone for up to `steps` tokens (until EOS); `start`: tokens generated before (a recompute)."""
    out = list(start or [])
    context = prompt + out
    table = list(range(16))
    work = SeqWork(rid, context, 0, table, sampling, len(out))
    for _ in range(steps):
        token = runner.step([work])[0]
        out.append(token)
        if token == runner.spec.eos_token_id:
            break
        work = SeqWork(rid, [token], len(prompt) + len(out) - 1, table, sampling, len(out))
    return out


def text(tokens: list[int]) -> str:
    return ByteTokenizer().decode(tokens)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(
        resolve_model("opt-tiny"), dtype=torch.float32, device="cpu", num_gpu_blocks=64, seed=1
    )


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_outputs_validate_from_random_weights(runner, seed):
    key = structured.key(spec_of(json=json.dumps(SCHEMA)))
    sampling = SamplingParams(temperature=1.0, seed=seed, structured=key)
    tokens = generate(runner, f"j{seed}", [2, 72, 105], sampling, 200)
    assert tokens[-1] == runner.spec.eos_token_id
    jsonschema.validate(json.loads(text(tokens)), SCHEMA)


def test_choice_regex_and_grammar_constrain_the_output(runner):
    choice = structured.key(spec_of(choice=common_pb2.Choices(choices=["yes", "no", 'maybe "so"'])))
    regex = structured.key(spec_of(regex=r"[0-9]{3}-[a-z]{2}"))
    grammar = structured.key(spec_of(grammar='root ::= "(" [ab]+ ")"'))
    for seed in range(3):
        assert text(
            generate(runner, "c", [2, 40], SamplingParams(temperature=1.0, seed=seed, structured=choice), 30)
        ) in ("yes", "no", 'maybe "so"')
        out = text(
            generate(runner, "r", [2, 40], SamplingParams(temperature=1.0, seed=seed, structured=regex), 30)
        )
        assert len(out) == 6 and out[:3].isdigit() and out[3] == "-" and out[4:].isalpha()
        out = text(
            generate(runner, "g", [2, 40], SamplingParams(temperature=1.0, seed=seed, structured=grammar), 30)
        )
        assert out[0] == "(" and out[-1] == ")" and set(out[1:-1]) <= {"a", "b"}


def test_a_recompute_rebuilds_the_grammar_state_from_the_tokens_so_far(runner):
    """Seeded sampling depends only on (logits, seed, sample_index): a job recomputed after k tokens,
    on a fresh runner that never saw it (a worker restart), continues exactly as the uninterrupted one."""
    key = structured.key(spec_of(json=json.dumps(SCHEMA)))
    sampling = SamplingParams(temperature=1.0, seed=7, structured=key)
    whole = generate(runner, "w", [2, 72, 105], sampling, 200)
    k = len(whole) // 2
    fresh = ModelRunner(
        resolve_model("opt-tiny"), dtype=torch.float32, device="cpu", num_gpu_blocks=64, seed=1
    )
    assert generate(fresh, "w", [2, 72, 105], sampling, 200 - k, start=whole[:k]) == whole


def test_unconstrained_rows_beside_a_constrained_one_are_untouched(runner):
    key = structured.key(spec_of(regex="[a]+"))
    plain = SamplingParams(temperature=1.0, seed=3)
    alone = runner.step([SeqWork("p", [2, 10, 20], 0, [0], plain)])
    mixed = runner.step(
        [
            SeqWork("q", [2, 40], 0, [1], SamplingParams(temperature=1.0, seed=3, structured=key)),
            SeqWork("p", [2, 10, 20], 0, [0], plain),
        ]
    )
    assert mixed[1] == alone[0] and mixed[0] == 4 + ord("a")


def test_the_worker_keeps_the_last_cache_size_compiled_grammars(runner):
    spec = runner.spec
    grammars = Grammars(spec.tokenizer, spec.vocab_size, spec.eos_token_id)
    assert grammars.cache_size == structured.CACHE_SIZE == 256
    grammars.cache_size = 2
    a, b, c = ("regex", "a+"), ("regex", "b+"), ("regex", "c+")
    first_a = grammars.compile(a)
    grammars.compile(b)
    assert grammars.compile(a) is first_a  # a hit, and `a` becomes the most recently used
    grammars.compile(c)  # evicts `b`, the least recently used
    assert list(grammars._compiled) == [a, c]
    assert grammars.compile(b) is not None and list(grammars._compiled) == [c, b]
    assert grammars.compile(a) is not first_a  # evicted, compiled again
    assert grammars.compile(a).result() is not None

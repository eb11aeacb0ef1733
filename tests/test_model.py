"""Our OPT (paged KV cache, flattened mixed batches) against Hugging Face's OPTForCausalLM.

Same checkpoint, fp32: logits must agree to float rounding, greedy tokens exactly.
"""

from __future__ import annotations

import argparse
import random

import pytest
import torch

from fastserve.model_spec import resolve_model
from fastserve.services.worker.runner import ModelRunner, SeqWork
from tests.helpers_checkpoint import make_tiny_opt_checkpoint

BLOCK = 16
ATOL = 5e-5  # logits are O(1-10); fp32 differences from op order are ~1e-6


@pytest.fixture(scope="module")
def pre_ln_checkpoint(tmp_path_factory):
    return make_tiny_opt_checkpoint(tmp_path_factory.mktemp("pre-ln"), layers=4, heads=4, hidden=64)


@pytest.fixture(scope="module")
def post_ln_checkpoint(tmp_path_factory):
    """opt-350m's layout in miniature: post-LN, no final norm, embeddings projected 32 <-> 64."""
    return make_tiny_opt_checkpoint(
        tmp_path_factory.mktemp("post-ln"),
        layers=3,
        heads=4,
        hidden=64,
        word_embed_proj_dim=32,
        do_layer_norm_before=False,
        seed=1,
    )


def hf_model(checkpoint):
    from transformers import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def make_runner(checkpoint, num_blocks: int = 96, enforce_eager: bool = False) -> ModelRunner:
    return ModelRunner(
        resolve_model(str(checkpoint)),
        dtype=torch.float32,
        device="cpu",
        num_gpu_blocks=num_blocks,
        enforce_eager=enforce_eager,
    )


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def all_logits(runner: ModelRunner, seqs: list[SeqWork]) -> list[torch.Tensor]:
    """Logits of every fed token, per seq: the model's forward without the last-token selection."""
    with torch.inference_mode():
        inputs = runner.prepare(seqs)
        hidden = runner.model(runner.model.embed(inputs.input_ids, inputs.positions), inputs.meta, runner.kv)
        logits = runner.model.logits(hidden)
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    offset = 0
    for i in inputs.order:
        n = len(seqs[i].token_ids)
        out[i] = logits[offset : offset + n]
        offset += n
    return out


class Blocks:
    """A shuffled free list, so block tables are scattered across the pool."""

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def table(self, tokens: int) -> list[int]:
        n = -(-tokens // BLOCK)
        table, self.free = self.free[:n], self.free[n:]
        return table


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [2] + [rng.randrange(4, 260) for _ in range(length - 1)]


@pytest.mark.parametrize("ckpt", ["pre_ln_checkpoint", "post_ln_checkpoint"])
def test_prefill_logits_equal_transformers(ckpt, request):
    checkpoint = request.getfixturevalue(ckpt)
    runner, hf = make_runner(checkpoint), hf_model(checkpoint)
    blocks = Blocks(runner.num_blocks)
    prompts = [prompt(n, n) for n in (1, 5, 16, 17, 40)]
    seqs = [SeqWork(f"r{i}", p, 0, blocks.table(len(p))) for i, p in enumerate(prompts)]
    for p, ours in zip(prompts, all_logits(runner, seqs), strict=True):
        torch.testing.assert_close(ours, hf_logits(hf, p), atol=ATOL, rtol=1e-5)


def test_decode_through_scattered_block_tables_equals_transformers(pre_ln_checkpoint):
    """Prefill, then decode token by token across block boundaries (lengths 13..36, 16..39)."""
    runner, hf = make_runner(pre_ln_checkpoint), hf_model(pre_ln_checkpoint)
    blocks = Blocks(runner.num_blocks, seed=1)
    rng = random.Random(7)
    contexts = [prompt(13, 1), prompt(16, 2), prompt(1, 3)]
    tables = [blocks.table(64) for _ in contexts]
    all_logits(
        runner, [SeqWork(f"r{i}", c, 0, t) for i, (c, t) in enumerate(zip(contexts, tables, strict=True))]
    )
    for _ in range(24):
        new = [rng.randrange(4, 260) for _ in contexts]
        seqs = [
            SeqWork(f"r{i}", [tok], len(c), t)
            for i, (c, tok, t) in enumerate(zip(contexts, new, tables, strict=True))
        ]
        ours = all_logits(runner, seqs)
        for c, tok, got in zip(contexts, new, ours, strict=True):
            c.append(tok)
            torch.testing.assert_close(got[0], hf_logits(hf, c)[-1], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["fast", "eager"])
def test_mixed_batch_of_decodes_prefills_and_a_chunked_prefill(pre_ln_checkpoint, enforce_eager):
    """One step holding decodes, fresh prefills and a prefill continuing at start_pos > 0, on the
    fast path (oneDNN-packed linears on CPU) and on the reference path (plain F.linear)."""
    runner, hf = make_runner(pre_ln_checkpoint, enforce_eager=enforce_eager), hf_model(pre_ln_checkpoint)
    packed = [m.packed is not None for m in runner.model.modules() if hasattr(m, "packed")]
    assert packed and all(p != enforce_eager for p in packed)
    blocks = Blocks(runner.num_blocks, seed=2)
    a, b, c, d = prompt(20, 10), prompt(33, 11), prompt(7, 12), prompt(45, 13)
    tables = {k: blocks.table(80) for k in "abcd"}
    # Warm-up step: a and b prefilled whole; d only its first 18 tokens (a chunk).
    all_logits(
        runner,
        [
            SeqWork("a", a, 0, tables["a"]),
            SeqWork("b", b, 0, tables["b"]),
            SeqWork("d", d[:18], 0, tables["d"]),
        ],
    )
    a2, b2 = [*a, 77], [*b, 78]
    seqs = [
        SeqWork("b", [78], len(b), tables["b"]),  # decode
        SeqWork("c", c, 0, tables["c"]),  # fresh prefill
        SeqWork("d", d[18:], 18, tables["d"]),  # rest of d's prompt, attends to its cached prefix
        SeqWork("a", [77], len(a), tables["a"]),  # decode
    ]
    ours = all_logits(runner, seqs)
    torch.testing.assert_close(ours[0][0], hf_logits(hf, b2)[-1], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours[1], hf_logits(hf, c), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours[2], hf_logits(hf, d)[18:], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours[3][0], hf_logits(hf, a2)[-1], atol=ATOL, rtol=1e-5)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    # eos_token_id=None would fall back to the model's EOS and stop early; [] means none.
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=1)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=config)
    tokens = out[0, len(ids) :].tolist()
    assert len(tokens) == n, "transformers stopped early"
    return tokens


def runner_greedy(runner: ModelRunner, prompts: list[list[int]], n: int, joins: list[int]) -> list[list[int]]:
    """A minimal continuous-batching loop: prompt i joins at iteration joins[i]; everything
    runs in one batch per iteration (so most iterations mix prefills and decodes)."""
    blocks = Blocks(runner.num_blocks, seed=3)
    tables = [blocks.table(len(p) + n) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    it = 0
    while any(len(o) < n for o in out):
        seqs, who = [], []
        for i, p in enumerate(prompts):
            if joins[i] > it or len(out[i]) >= n:
                continue
            if not out[i]:
                seqs.append(SeqWork(f"r{i}", p, 0, tables[i], sample_index=0))
            else:
                pos = len(p) + len(out[i]) - 1
                seqs.append(SeqWork(f"r{i}", [out[i][-1]], pos, tables[i], sample_index=len(out[i])))
            who.append(i)
        if seqs:
            for i, tok in zip(who, runner.step(seqs), strict=True):
                out[i].append(tok)
        it += 1
    return out


@pytest.mark.parametrize("ckpt", ["pre_ln_checkpoint", "post_ln_checkpoint"])
def test_batched_greedy_generation_equals_transformers_generate(ckpt, request):
    checkpoint = request.getfixturevalue(ckpt)
    runner, hf = make_runner(checkpoint), hf_model(checkpoint)
    prompts = [prompt(n, 100 + n) for n in (3, 17, 9, 32, 1, 24)]
    n = 20
    got = runner_greedy(runner, prompts, n, joins=[0, 0, 2, 5, 5, 11])
    for i, p in enumerate(prompts):
        assert got[i] == hf_greedy(hf, p, n), f"prompt {i} (length {len(p)}) differs"


@pytest.mark.parametrize("fmt", ["bin", "sharded-safetensors"])
def test_loader_reads_bin_and_sharded_checkpoints(fmt, tmp_path, pre_ln_checkpoint):
    if fmt == "bin":
        other = make_tiny_opt_checkpoint(tmp_path, safe_serialization=False)
    else:
        other = make_tiny_opt_checkpoint(tmp_path, max_shard_size="40KB")
        assert (other / "model.safetensors.index.json").is_file()
    a, b = make_runner(pre_ln_checkpoint), make_runner(other)
    for (name, x), (_, y) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(x, y), name


def test_a_plain_cuda_device_gets_the_current_index(monkeypatch):
    """torch.cuda.set_device refuses "cuda" without an index, which a single-GPU worker is given."""
    from fastserve.services.worker.runner import with_index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert with_index(torch.device("cuda")) == torch.device("cuda", 3)
    assert with_index(torch.device("cuda:1")) == torch.device("cuda", 1)
    assert with_index(torch.device("cpu")) == torch.device("cpu")


def test_decode_graph_buckets_pad_into_a_scratch_block_and_match_the_plain_step(pre_ln_checkpoint):
    """The CUDA-graph path without a graph (what a CPU runs): decode-only batches are padded to
    the next bucket in static buffers, padded rows write into a scratch block past the pool, and
    every token equals the plain runner's; batches above the largest bucket and prefills run
    the plain step. Batch sizes go up and down so stale padding would show."""
    spec = resolve_model(str(pre_ln_checkpoint))
    graphs = ModelRunner(spec, dtype=torch.float32, device="cpu", num_gpu_blocks=96, cuda_graph_sizes=(2, 4))
    plain = make_runner(pre_ln_checkpoint)
    assert graphs.graphs is not None and graphs.kv.k_cache[0].shape[0] == 97 and plain.graphs is None
    assert [graphs.graphs.bucket(n) for n in (1, 2, 3, 4, 5)] == [2, 2, 4, 4, None]
    blocks = Blocks(96, seed=4)
    prompts = [prompt(n, 200 + n) for n in (5, 18, 9, 30, 2)]
    tables = [blocks.table(len(p) + 24) for p in prompts]
    out = {"graphs": [[] for _ in prompts], "plain": [[] for _ in prompts]}
    for it, live in enumerate([5, 5, 3, 4, 1, 2, 4, 3, 1, 5, 2]):  # jobs decoding this iteration
        for name, runner in (("graphs", graphs), ("plain", plain)):
            gen = out[name]
            seqs = [
                SeqWork(f"r{i}", [gen[i][-1]], len(prompts[i]) + len(gen[i]) - 1, tables[i])
                if gen[i]
                else SeqWork(f"r{i}", prompts[i], 0, tables[i])
                for i in range(live)
            ]
            for i, tok in enumerate(runner.step(seqs)):
                gen[i].append(tok)
        assert out["graphs"] == out["plain"], f"iteration {it}"
    assert graphs.kv.k_cache[0][96].abs().sum() > 0  # the padded rows did write into the scratch block


def test_cuda_graph_sizes_parse_and_refuse_nonsense():
    from fastserve.services.worker.cuda_graphs import parse_sizes

    assert parse_sizes("8, 1,2,2") == [1, 2, 8] and parse_sizes("") == []
    for bad in ("0,4", "2,x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="cuda-graph-sizes must be .* >= 1"):
            parse_sizes(bad)

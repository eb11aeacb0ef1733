"""Tensor and pipeline parallelism over real torch.distributed (gloo) process groups on CPU.

Every rank runs the same iteration loop, as the workers do when the scheduler sends each
of them the same steps. The scheduler's part, feeding the sampled tokens into the next
step, is played here by a broadcast of the driver's tokens (test plumbing only).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastserve.model_spec import resolve_model
from fastserve.procs import free_port
from fastserve.services.worker.runner import ModelRunner, SeqWork
from fastserve.services.worker.tp import init_distributed, split_range
from tests.helpers_checkpoint import make_tiny_opt_checkpoint

BLOCK = 16
NEW_TOKENS = 12
PROMPT_LENGTHS = (5, 17, 1, 30)
JOINS = (0, 0, 3, 6)  # iteration at which each prompt joins: later steps mix prefill and decode


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[2] + [rng.randrange(4, 260) for _ in range(n - 1)] for n in PROMPT_LENGTHS]


def greedy_loop(runner: ModelRunner, step) -> list[list[int]]:
    """Continuous batching of the test prompts; ``step(seqs)`` returns the tokens on every rank."""
    ps = prompts()
    tables = [list(range(i * 4, i * 4 + 4)) for i in range(len(ps))][::-1]  # not in order
    out: list[list[int]] = [[] for _ in ps]
    it = 0
    while any(len(o) < NEW_TOKENS for o in out):
        seqs, who = [], []
        for i, p in enumerate(ps):
            if JOINS[i] > it or len(out[i]) >= NEW_TOKENS:
                continue
            if not out[i]:
                seqs.append(SeqWork(f"r{i}", p, 0, tables[i]))
            else:
                seqs.append(SeqWork(f"r{i}", [out[i][-1]], len(p) + len(out[i]) - 1, tables[i]))
            who.append(i)
        if seqs:
            for i, tok in zip(who, step(seqs), strict=True):
                out[i].append(tok)
        it += 1
    return out


def local_numel(runner: ModelRunner) -> int:
    return sum(p.numel() for p in runner.model.parameters())  # parameters() counts the tied head once


def _rank_main(rank: int, world: int, tp: int, pp: int, port: int, checkpoint: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 cores, up to 4 ranks
    ctx = init_distributed(rank, world, tp, pp, "127.0.0.1", port, backend="gloo", timeout_s=120)
    try:
        runner = ModelRunner(
            resolve_model(checkpoint), dtype=torch.float32, device="cpu", num_gpu_blocks=16, parallel=ctx
        )
        driver = (pp - 1) * tp  # global rank of TP rank 0 of the last stage

        def step(seqs):
            tokens = runner.step(seqs)
            assert (tokens is not None) == runner.is_driver
            box = [tokens]
            dist.broadcast_object_list(box, src=driver)
            return box[0]

        tokens = greedy_loop(runner, step)
        ctx.wait_sends()
        report = {
            "tokens": tokens,
            "numel": local_numel(runner),
            "kv_bytes": runner.kv.nbytes,
            "layers": [runner.model.layer_start, runner.model.layer_end],
            "is_driver": runner.is_driver,
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    # max_positions 64 (prompts + outputs need 42): keeps the replicated position table ~3% of the model
    path = make_tiny_opt_checkpoint(
        tmp_path_factory.mktemp("tp-pp"), layers=4, heads=4, hidden=64, max_positions=64
    )
    return str(path)


def run_single(checkpoint: str) -> dict:
    runner = ModelRunner(resolve_model(checkpoint), dtype=torch.float32, device="cpu", num_gpu_blocks=16)
    return {
        "tokens": greedy_loop(runner, runner.step),
        "numel": local_numel(runner),
        "kv_bytes": runner.kv.nbytes,
    }


def run_world(tp: int, pp: int, checkpoint: str, out_dir: Path) -> list[dict]:
    world = tp * pp
    mp.spawn(_rank_main, args=(world, tp, pp, free_port(), checkpoint, str(out_dir)), nprocs=world, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def single(checkpoint):
    return run_single(checkpoint)


def test_single_rank_equals_transformers(checkpoint, single):
    from transformers import GenerationConfig, OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[], pad_token_id=1)
    for p, got in zip(prompts(), single["tokens"], strict=True):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist()
        assert got == ref
    # spec.num_params counts the model the way HF does (lm_head tied to embed_tokens)
    assert single["numel"] == resolve_model(checkpoint).num_params() == model.num_parameters()


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)])
def test_parallel_greedy_tokens_equal_single_rank(tp, pp, checkpoint, single, tmp_path):
    world = tp * pp
    reports = run_world(tp, pp, checkpoint, tmp_path)
    assert [r["is_driver"] for r in reports] == [r == (pp - 1) * tp for r in range(world)]
    for r in reports:
        assert r["tokens"] == single["tokens"]
        assert r["kv_bytes"] * world == single["kv_bytes"]  # each rank: its stage's layers x its heads
    assert [tuple(reports[s * tp]["layers"]) for s in range(pp)] == [split_range(4, pp, s) for s in range(pp)]

    # Parameters: every rank holds 1/world of the sharded weights (q/k/v, out_proj, fc1, fc2
    # matrices, fc1 bias, vocab rows of the embedding / LM head) plus, replicated on each TP
    # rank of its stage, the small rest: position embeddings (stage 0), layer norms,
    # out_proj/fc2 biases and the final norm (last stage). With PP > 1 the last stage also
    # holds its own vocab shard of the LM head, tied on a single stage. So a rank holds
    # full/world, give or take the replicated parameters.
    spec = resolve_model(checkpoint)
    h = spec.hidden_size
    replicated = (
        (spec.max_positions + 2) * h + spec.num_layers * 6 * h + 2 * h + (pp > 1) * spec.vocab_size * h
    )
    for r in reports:
        assert abs(r["numel"] - single["numel"] / world) <= replicated / tp, r["numel"]
    if (tp, pp) == (2, 2):
        shares = [r["numel"] / single["numel"] for r in reports]
        print("TP=2 x PP=2 parameter shares per rank:", [round(s, 3) for s in shares])
        # About a quarter: 0.30 on stage 0 (+ the position table), 0.27 on stage 1 (+ the LM head
        # shard; in this tiny model the 272 x 64 vocabulary matrix is 11% of all parameters).
        assert all(0.25 < s < 0.31 for s in shares), shares


def test_tp_with_a_vocabulary_that_does_not_split_evenly(tmp_path):
    """271 rows over 2 ranks: 136 each, the last one zero-padded, its logit cut after the gather."""
    checkpoint = str(
        make_tiny_opt_checkpoint(tmp_path / "ckpt", layers=2, vocab=271, max_positions=64, seed=5)
    )
    (tmp_path / "out").mkdir()
    reports = run_world(2, 1, checkpoint, tmp_path / "out")
    assert reports[0]["tokens"] == run_single(checkpoint)["tokens"]


@pytest.mark.parametrize(("tp", "pp", "rank"), [(4, 1, 0), (4, 1, 3), (1, 2, 0), (1, 2, 1), (2, 2, 3)])
def test_a_rank_loads_exactly_its_slices(tp, pp, rank, tmp_path):
    """No process group needed: building and loading a shard are local to the rank."""
    from safetensors.torch import load_file

    from fastserve.services.worker.loader import load_checkpoint
    from fastserve.services.worker.model import OPTShard
    from fastserve.services.worker.tp import ParallelContext

    ckpt = make_tiny_opt_checkpoint(
        tmp_path, layers=3, heads=4, hidden=32, ffn=64, vocab=270, max_positions=32
    )
    full = {k.removeprefix("model."): v for k, v in load_file(ckpt / "model.safetensors").items()}
    spec = resolve_model(str(ckpt))
    ctx = ParallelContext(rank=rank, world_size=tp * pp, tp_size=tp, pp_size=pp)
    shard = OPTShard(spec, ctx, dtype=torch.float32, device="cpu")
    load_checkpoint(shard, ckpt)
    params = dict(shard.named_parameters())

    r, d = ctx.tp_rank, spec.hidden_size // tp  # this rank's q/k/v rows (heads) and out_proj columns
    f = spec.ffn_dim // tp
    start, end = split_range(spec.num_layers, pp, ctx.pp_stage)
    assert len(shard.layers) == end - start
    for i, g in enumerate(range(start, end)):
        hf = f"decoder.layers.{g}"
        qkv = torch.cat([full[f"{hf}.self_attn.{p}_proj.weight"][r * d : (r + 1) * d] for p in "qkv"])
        assert torch.equal(params[f"layers.{i}.qkv_proj.weight"], qkv)
        assert torch.equal(
            params[f"layers.{i}.out_proj.weight"],
            full[f"{hf}.self_attn.out_proj.weight"][:, r * d : (r + 1) * d],
        )
        assert torch.equal(params[f"layers.{i}.out_proj.bias"], full[f"{hf}.self_attn.out_proj.bias"])
        assert torch.equal(params[f"layers.{i}.fc1.bias"], full[f"{hf}.fc1.bias"][r * f : (r + 1) * f])
        assert torch.equal(params[f"layers.{i}.fc2.weight"], full[f"{hf}.fc2.weight"][:, r * f : (r + 1) * f])
        assert torch.equal(
            params[f"layers.{i}.final_layer_norm.weight"], full[f"{hf}.final_layer_norm.weight"]
        )
    rows = -(-spec.vocab_size // tp)
    vocab = torch.cat(
        [full["decoder.embed_tokens.weight"], torch.zeros(rows * tp - spec.vocab_size, spec.hidden_size)]
    )
    expected_vocab = vocab[r * rows : (r + 1) * rows]
    names = set(params)
    if ctx.is_first_stage:
        assert torch.equal(params["embed_tokens.weight"], expected_vocab)
        assert torch.equal(params["embed_positions.weight"], full["decoder.embed_positions.weight"])
    else:
        assert not names & {"embed_tokens.weight", "embed_positions.weight"}
    if ctx.is_last_stage:
        assert torch.equal(shard.lm_head.weight, expected_vocab)
        assert torch.equal(params["final_layer_norm.bias"], full["decoder.final_layer_norm.bias"])
        assert ("lm_head.weight" in names) == (not ctx.is_first_stage)  # tied: one tensor on one stage
    else:
        assert not any(n.startswith(("lm_head", "final_layer_norm")) for n in names)

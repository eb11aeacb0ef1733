"""ModelRunner around the model: sampling, presets and dummy weights, input checks, the torch decode path."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from fastserve import structured
from fastserve.model_spec import PRESETS, resolve_model
from fastserve.services.worker import attention, cpu_kernels
from fastserve.services.worker.penalties import TokenCounts, process_logits
from fastserve.services.worker.runner import ModelRunner, SeqWork
from fastserve.services.worker.sampling import Sampler, SamplingParams, derive_seed, logprobs
from fastserve.v1 import common_pb2
from tests.helpers_checkpoint import make_tiny_opt_checkpoint

VOCAB = 272


def draw(sampler: Sampler, logits: torch.Tensor, rows: list[dict]) -> list[int]:
    params = [
        SamplingParams(**{"temperature": 1.0, **{k: v for k, v in r.items() if k != "sample_index"}})
        for r in rows
    ]
    return sampler(logits, params, [r.get("sample_index", 0) for r in rows])


# --- sampling ---------------------------------------------------------------------------------


def test_seeded_sampling_is_independent_of_batch_composition_and_position():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=gen) * 2
    rows = [
        {"seed": 1, "sample_index": 0},
        {"seed": 1, "sample_index": 1, "top_k": 20},
        {"seed": 2, "sample_index": 5, "top_p": 0.8, "temperature": 0.7},
        {"seed": 3, "sample_index": 0, "top_k": 50, "top_p": 0.9, "temperature": 1.3},
        {"temperature": 0.0},
        {"seed": 2**64 - 1, "sample_index": 3},  # the proto's seed is a uint64
    ]
    sampler = Sampler(0, "cpu")
    together = draw(sampler, logits, rows)
    alone = [draw(sampler, logits[i : i + 1], [rows[i]])[0] for i in range(len(rows))]
    order = [3, 0, 5, 1, 4, 2]
    shuffled = draw(sampler, logits[order], [rows[i] for i in order])
    assert together == alone
    assert [together[i] for i in order] == shuffled
    assert together[4] == int(logits[4].argmax())


def test_sample_index_changes_the_draw_and_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = probs.log().expand(n, -1).contiguous()
    rows = [{"seed": 42, "sample_index": i} for i in range(n)]
    counts = Counter(draw(Sampler(0, "cpu"), logits, rows))
    for token, p in enumerate(probs.tolist()):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[token] - n * p) < 5 * sigma, (token, counts)
    assert derive_seed(42, 0) != derive_seed(42, 1) != derive_seed(43, 0)


def test_top_k_one_and_tiny_top_p_equal_greedy_and_filters_restrict_support():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(32, VOCAB, generator=gen)
    sampler = Sampler(0, "cpu")
    greedy = logits.argmax(-1).tolist()
    assert draw(sampler, logits, [{"seed": i, "top_k": 1, "temperature": 2.0} for i in range(32)]) == greedy
    assert draw(sampler, logits, [{"seed": i, "top_p": 1e-6} for i in range(32)]) == greedy
    assert draw(sampler, logits, [{"seed": i, "top_p": 0.0} for i in range(32)]) == greedy

    row = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(300, -1).contiguous()
    top2 = set(draw(sampler, row, [{"seed": 7, "sample_index": i, "top_k": 2} for i in range(300)]))
    assert top2 == {0, 1}
    # softmax([4,3,2,1,0]) = .64, .23, .09, ...: top_p 0.8 keeps exactly the first two
    nucleus = set(draw(sampler, row, [{"seed": 8, "sample_index": i, "top_p": 0.8} for i in range(300)]))
    assert nucleus == {0, 1}
    # min_p 0.3 keeps tokens with p >= 0.3 x 0.64: the first two (0.23 >= 0.19, 0.09 < 0.19)
    min_p = set(draw(sampler, row, [{"seed": 9, "sample_index": i, "min_p": 0.3} for i in range(300)]))
    assert min_p == {0, 1}


def test_penalties_bias_and_min_tokens_follow_vllm_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    counts = TokenCounts(5, torch.device("cpu"))
    counts.start("a", [0, 1], [3, 3, 2])  # prompt 0 1, generated 3 3 2
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(logit_bias=((4, 10.0),), min_tokens=2, stop_token_ids=(0, 2)),
    ]
    out = process_logits(logits.clone(), params, [3, 1], ["a", "b"], counts)
    # a: repetition on prompt + generated (2/2, -1*2, 0.5/2, 3/2); then -0.5*count - 0.25*seen on generated
    assert out[0].tolist() == [1.0, -2.0, 0.25 - 0.5 - 0.25, 1.5 - 1.0 - 0.25, -2.0]
    assert out[1].tolist() == [float("-inf"), 1.0, float("-inf"), 1.0, 11.0]  # masked until 2 generated
    assert process_logits(logits[1:].clone(), params[1:], [2], ["b"], counts)[0, 0] == 1.0
    counts.add(["a"], [4])
    assert counts.rows(["a"])[0].tolist() == [[0.0, 0.0, 1.0, 2.0, 1.0]]
    counts.forget(["a"])
    assert "a" not in counts


def test_logprobs_are_of_the_tempered_distribution_with_ranks():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    params = [SamplingParams(logprobs=2), SamplingParams(temperature=2.0, logprobs=0)]
    out = logprobs(logits, params, [1, 2])
    greedy = logits[0].log_softmax(-1)
    assert out[0].token_id == 1 and out[0].rank == 1 and out[0].logprob == pytest.approx(greedy[1].item())
    assert [t for t, _ in out[0].top] == [1, 2]
    assert out[1].rank == 2 and out[1].top == []
    assert out[1].logprob == pytest.approx((logits[1] / 2).log_softmax(-1)[2].item())
    assert logprobs(logits, [SamplingParams(), SamplingParams()], [1, 1]) == {}


def test_unseeded_sampling_is_reproducible_per_runner_seed():
    logits = torch.zeros(16, VOCAB)
    rows = [{"seed": None}] * 16
    a, b, c = Sampler(5, "cpu"), Sampler(5, "cpu"), Sampler(6, "cpu")
    first = draw(a, logits, rows)
    assert first == draw(b, logits, rows)
    assert first != draw(c, logits, rows)
    assert first != draw(a, logits, rows)  # the runner-level stream advances


# --- presets and dummy weights ------------------------------------------------------------------


def test_presets_have_the_real_shapes():
    spec = resolve_model("opt-13b")
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.ffn_dim) == (5120, 40, 40, 20480)
    assert (spec.vocab_size, spec.max_positions, spec.word_embed_proj_dim) == (50272, 2048, 5120)
    assert spec.do_layer_norm_before and spec.checkpoint is None and spec.tokenizer == "facebook/opt-13b"
    assert (spec.pad_token_id, spec.bos_token_id, spec.eos_token_id) == (1, 2, 2)
    small = resolve_model("opt-350m")
    assert small.word_embed_proj_dim == 512 and not small.do_layer_norm_before
    sizes = {
        "opt-125m": 125e6,
        "opt-350m": 331e6,
        "opt-1.3b": 1.3e9,
        "opt-2.7b": 2.7e9,
        "opt-6.7b": 6.7e9,
        "opt-13b": 13e9,
        "opt-30b": 30e9,
        "opt-66b": 66e9,
        "opt-175b": 175e9,
    }
    for name, params in sizes.items():
        assert abs(PRESETS[name].num_params() / params - 1) < 0.05, name
    tiny = resolve_model("opt-tiny")
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.ffn_dim) == (
        272,
        128,
        4,
        4,
        512,
    )
    assert tiny.tokenizer == "byte" and tiny.checkpoint is None


def test_resolve_directory_and_unknown_model(tmp_path):
    ckpt = make_tiny_opt_checkpoint(
        tmp_path / "ckpt", layers=2, word_embed_proj_dim=32, do_layer_norm_before=False
    )
    spec = resolve_model(str(ckpt))
    assert spec.checkpoint == str(ckpt.resolve()) and spec.tokenizer == spec.checkpoint
    assert (spec.num_layers, spec.word_embed_proj_dim, spec.do_layer_norm_before) == (2, 32, False)
    assert resolve_model(spec.name) == spec  # other services re-resolve the name a worker reports
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        resolve_model("no-such-org/no-such-model")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dummy_opt_tiny_runs_a_step(dtype):
    spec = resolve_model("opt-tiny")
    runner = ModelRunner(spec, dtype=dtype, device="cpu", num_gpu_blocks=8, seed=3)
    assert runner.is_driver and all(p.dtype == dtype for p in runner.model.parameters())
    seqs = [SeqWork("a", [2, 72, 105], 0, [0]), SeqWork("b", [2, *range(40, 60)], 0, [1, 2])]
    first = runner.step(seqs)
    assert len(first) == 2 and all(0 <= t < spec.vocab_size for t in first)
    again = ModelRunner(spec, dtype=dtype, device="cpu", num_gpu_blocks=8, seed=3).step(seqs)
    assert again == first  # dummy weights are deterministic in the seed
    nxt = runner.step([SeqWork("a", [first[0]], 3, [0]), SeqWork("b", [first[1]], 21, [1, 2])])
    assert len(nxt) == 2


def test_seeded_sampling_through_the_runner_ignores_batch_composition():
    runner = ModelRunner(resolve_model("opt-tiny"), dtype=torch.float32, device="cpu", num_gpu_blocks=16)
    a = SeqWork("a", [2, 10, 20, 30], 0, [0], SamplingParams(temperature=0.9, top_p=0.95, seed=11))
    b = SeqWork("b", [2, 99], 0, [1], SamplingParams(temperature=1.0, seed=12))
    c = SeqWork("c", [2, 50, 51, 52, 53], 0, [2], SamplingParams(temperature=0.0))
    alone = runner.step([a])
    assert runner.step([b, c, a])[2] == alone[0]
    greedy = runner.step([SeqWork("a", a.token_ids, 0, [0])])
    top1 = runner.step([SeqWork("a", a.token_ids, 0, [0], SamplingParams(temperature=1.5, top_k=1, seed=4))])
    assert top1 == greedy


def test_forget_all_drops_every_jobs_counts_matcher_and_last_token():
    runner = ModelRunner(resolve_model("opt-tiny"), dtype=torch.float32, device="cpu", num_gpu_blocks=16)
    regex = structured.key(common_pb2.StructuredOutputs(regex="[a-z]+"))
    runner.step(
        [
            SeqWork("p", [2, 10, 20], 0, [0], SamplingParams(temperature=0.0, presence_penalty=0.5)),
            SeqWork("g", [2, 30], 0, [1], SamplingParams(temperature=0.0, structured=regex)),
        ]
    )
    assert "p" in runner.token_counts and "g" in runner.grammars.matchers
    assert set(runner.last_tokens) == {"p", "g"}
    runner.last_tokens.clear()  # as on a PP driver, which keeps no last tokens
    runner.forget_all()
    assert not runner.token_counts.slots and not runner.grammars.matchers and not runner.last_tokens


def test_kv_bytes_per_block_and_pool_shape():
    spec = resolve_model("opt-13b")
    assert ModelRunner.kv_bytes_per_block(spec, torch.float16, 16) == 2 * 40 * 16 * 5120 * 2
    assert (
        ModelRunner.kv_bytes_per_block(spec, torch.float16, 16, tp_size=2, pp_size=2)
        == 2 * 20 * 16 * 2560 * 2
    )
    tiny = resolve_model("opt-tiny")
    runner = ModelRunner(tiny, dtype=torch.float32, device="cpu", num_gpu_blocks=5, block_size=8)
    assert len(runner.kv.k_cache) == 4 and runner.kv.k_cache[0].shape == (5, 8, 4, 32)
    assert runner.kv.nbytes == 5 * ModelRunner.kv_bytes_per_block(tiny, torch.float32, 8)


def test_a_pool_sized_by_a_function_is_sized_after_the_weights_load(monkeypatch):
    """On a GPU the function reads free memory: the weights must already be there (else a 6.7B model
    at --gpu-memory-utilization 0.9 would be given a pool the weights then do not fit beside)."""
    from fastserve.services.worker import runner as runner_module

    events: list[str] = []
    real_init = runner_module.init_dummy
    monkeypatch.setattr(runner_module, "init_dummy", lambda *a: (events.append("weights"), real_init(*a)))

    def size() -> int:
        events.append("sized")
        return 6

    runner = ModelRunner(resolve_model("opt-tiny"), dtype=torch.float32, device="cpu", num_gpu_blocks=size)
    assert events == ["weights", "sized"]
    assert runner.num_blocks == 6 and runner.kv.k_cache[0].shape[0] == 6


@pytest.mark.parametrize(
    ("work", "message"),
    [
        (SeqWork("x", [], 0, [0]), "no tokens"),
        (SeqWork("x", [2] * 17, 0, [0]), "cannot hold"),
        (SeqWork("x", [2, 300], 0, [0]), "token ids"),
        (SeqWork("x", [2, 3], 0, [9]), "block ids"),
        (SeqWork("x", [2], 2048, [0] * 129), "max_positions"),
    ],
)
def test_bad_work_is_a_clear_error(work, message):
    runner = ModelRunner(resolve_model("opt-tiny"), dtype=torch.float32, device="cpu", num_gpu_blocks=4)
    with pytest.raises(ValueError, match=message):
        runner.step([work])


# --- the torch decode path ------------------------------------------------------------------------


def cpp_decode():
    kernel = cpu_kernels.paged_decode()
    assert kernel is not None, "the C++ decode attention did not build here (see the worker's log)"
    return kernel


# the torch path two sequences per chunk / all at once, and the C++ kernel
@pytest.mark.parametrize("impl", ["torch-chunks", "torch-whole", "cpp"])
def test_paged_decode_attention_matches_a_dense_reference(monkeypatch, impl):
    monkeypatch.setattr(attention, "DECODE_CHUNK_BYTES", 1 if impl == "torch-chunks" else 1 << 30)
    decode = cpp_decode() if impl == "cpp" else attention.paged_decode_attention
    gen = torch.Generator().manual_seed(0)
    heads, dim, bs, num_blocks = 3, 16, 4, 40
    k_cache = torch.randn(num_blocks, bs, heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, bs, heads, dim, generator=gen)
    lens = [1, 4, 5, 13, 30]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [perm[8 * i : 8 * i + -(-n // bs)] for i, n in enumerate(lens)]
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    out = decode(q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32), dim**-0.5)
    want = dense_reference(q, k_cache, v_cache, tables, lens, dim**-0.5)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def dense_reference(q, k_cache, v_cache, tables: list[list[int]], lens: list[int], scale: float):
    """Decode attention in float64 over each sequence's blocks copied out of the pool: [B, H, D]."""
    heads, dim = q.shape[1:]
    rows = []
    for b, (n, table) in enumerate(zip(lens, tables, strict=True)):
        k = k_cache[table].reshape(-1, heads, dim)[:n].double()
        v = v_cache[table].reshape(-1, heads, dim)[:n].double()
        p = torch.softmax(torch.einsum("hd,thd->ht", q[b].double(), k) * scale, -1)
        rows.append(torch.einsum("ht,thd->hd", p, v))
    return torch.stack(rows)


def paged_case(lens: list[int], heads: int, seed: int):
    """A shuffled paged pool (block size 4) holding ``lens`` tokens, the block tables and queries."""
    gen = torch.Generator().manual_seed(seed)
    dim, bs = 16, 4
    widths = [-(-n // bs) for n in lens]
    num_blocks = sum(widths) + 3
    k_cache = torch.randn(num_blocks, bs, heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, bs, heads, dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    starts = [sum(widths[:i]) for i in range(len(lens))]
    tables = [perm[s : s + w] for s, w in zip(starts, widths, strict=True)]
    block_tables = torch.tensor([t + [0] * (max(widths) - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    return q, k_cache, v_cache, tables, block_tables


@pytest.mark.parametrize("lens", [[300], [130, 300], [1, 300, 70], [700, 3, 2, 1, 40]])
def test_cpp_decode_attention_splits_long_contexts_between_threads_correctly(lens):
    """A context longer than its share of the batch is split into runs whose softmaxes are merged:
    one sequence, fewer sequences than threads, one long context among short ones."""
    decode = cpp_decode()
    heads = 5
    q, k_cache, v_cache, tables, block_tables = paged_case(lens, heads, seed=2)
    want = dense_reference(q, k_cache, v_cache, tables, lens, 0.25)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            out = decode(q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32), 0.25)
            torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_cpp_decode_attention_answers_the_same_whichever_thread_takes_an_item():
    """Threads take work items as they free up; the runs of a sequence merge in a fixed order, so a
    thread count gives one answer, bit for bit, however the items fell to its threads."""
    decode = cpp_decode()
    lens = [290, 185, 70, 3, 2, 1, 140, 5, 1]  # long contexts first, as a priority order may put them
    q, k_cache, v_cache, _, block_tables = paged_case(lens, heads=4, seed=1)
    before = torch.get_num_threads()
    try:
        for threads in (2, 3):
            torch.set_num_threads(threads)
            lengths = torch.tensor(lens, dtype=torch.int32)
            outs = [decode(q, k_cache, v_cache, block_tables, lengths, 0.25) for _ in range(3)]
            assert all(torch.equal(outs[0], o) for o in outs[1:])
    finally:
        torch.set_num_threads(before)


def test_cpp_decode_attention_refuses_tables_outside_the_pool():
    kernel = cpp_decode()
    q, pool = torch.zeros(1, 2, 8), torch.zeros(4, 4, 2, 8)
    with pytest.raises(RuntimeError, match="block id outside the pool"):
        kernel(
            q, pool, pool, torch.tensor([[9]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), 1.0
        )
    with pytest.raises(RuntimeError, match="context length outside the block table"):
        kernel(
            q, pool, pool, torch.tensor([[1]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32), 1.0
        )


def test_runner_decodes_the_same_with_the_cpp_and_the_torch_attention():
    spec = resolve_model("opt-tiny")
    runners = {
        impl: ModelRunner(
            spec, dtype=torch.float32, device="cpu", num_gpu_blocks=32, seed=5, cpu_attention=impl
        )
        for impl in ("cpp", "torch")
    }
    assert runners["cpp"].cpu_decode is not None and runners["torch"].cpu_decode is None
    prompts = {"a": [2, 11, 12, 13], "b": [2, *range(30, 70)], "c": [2, 99]}
    tables = {"a": [0, 1], "b": [2, 3, 4, 5], "c": [6, 7]}
    out = {}
    for impl, runner in runners.items():
        tokens = runner.step([SeqWork(r, p, 0, tables[r]) for r, p in prompts.items()])
        pos = {r: len(p) for r, p in prompts.items()}
        generated = [tokens]
        for _ in range(12):  # decode-only steps, contexts crossing block boundaries
            tokens = runner.step(
                [SeqWork(r, [t], pos[r], tables[r]) for r, t in zip(prompts, tokens, strict=True)]
            )
            pos = {r: n + 1 for r, n in pos.items()}
            generated.append(tokens)
        out[impl] = generated
    assert out["cpp"] == out["torch"]


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 avx512f
processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2
"""


def test_the_cpp_kernel_is_cached_per_cpu_model_and_instruction_set():
    """It is built with -march=native: a build made on a CPU with AVX-512 must not load on one without."""
    sig = cpu_kernels.cpu_signature
    assert sig(CPUINFO) == sig(CPUINFO + "bogomips\t: 4000\n")  # only what -march=native reads counts
    assert sig(CPUINFO) != sig(CPUINFO.replace(" avx512f", "", 1))
    assert sig(CPUINFO) != sig(CPUINFO.replace("model\t\t: 1", "model\t\t: 17", 1))
    assert len(sig()) == 8 and sig() == sig()  # this machine's, stable
    assert sig("") == sig("")  # no /proc/cpuinfo: the platform's names

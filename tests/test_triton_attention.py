"""Correctness of the Triton paged decode-attention kernel, run on CPU under TRITON_INTERPRET=1.

``triton.jit`` chooses between the compiler and the interpreter when the kernel module is
imported, and other tests in the same pytest process may already have imported it (or
triton) without the interpreter. So every kernel call here runs in ONE child process that
this file starts with ``TRITON_INTERPRET=1`` (``python tests/test_triton_attention.py``
reads the cases as JSON on stdin and prints one JSON result per case). The parametrised
tests then check their own case's result, so a failure names the case.

The reference is written here, independently of the kernel and of the torch path: for each
sequence, gather its blocks through the block table, cut to context_len, and take a plain
softmax in float64. Cache slots that no sequence may read (unused blocks, the tail of each
last block, blocks named only by block-table padding) are filled with NaN, so any read past
context_len or through padding shows up as NaN in the output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Max abs error against the float64 reference (which upcasts the very same q/K/V, so input
# rounding is shared). Inputs are randn, so outputs, convex mixes of V rows, are O(1) and the
# kernel's fp32 arithmetic is far below these bounds; what remains is rounding the output to
# its dtype. fp16: half an ulp at |x| < 4 is <= 1e-3. bf16: Triton's interpreter converts
# fp32 -> bf16 by truncation (the GPU rounds to nearest), so allow one ulp at |x| < 4 (2^-6).
TOLERANCES = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def _case(name, *, bs, hd, heads, lens, dtype="float32", tile=None, scale=None, layout="contiguous", seed=0):
    return {
        "name": name,
        "block_size": bs,
        "head_dim": hd,
        "num_heads": heads,
        "context_lens": lens,
        "dtype": dtype,
        "tile": tile,
        "scale": scale,
        "layout": layout,
        "seed": seed,
    }


# Context lengths cover 1, block_size +- 1, exact multiples, and lengths spanning several
# kernel tiles (the default tile is 64 tokens for head_dim 128, 128 for head_dim <= 64).
CASES = [
    _case("bs16-d64-fp32-mixed", bs=16, hd=64, heads=4, lens=[1, 15, 16, 17, 50]),
    _case("bs8-d64-fp32-mixed", bs=8, hd=64, heads=2, lens=[1, 7, 8, 9, 200]),
    _case("bs32-d64-fp32-mixed", bs=32, hd=64, heads=2, lens=[31, 32, 33, 1, 130]),
    _case("bs16-d128-fp32-multitile", bs=16, hd=128, heads=2, lens=[64, 65, 129, 3]),
    _case("bs8-d32-fp32", bs=8, hd=32, heads=3, lens=[5, 24, 1]),
    _case("bs32-d128-fp32-len1", bs=32, hd=128, heads=1, lens=[1]),
    _case("bs16-d64-fp32-12heads-b1", bs=16, hd=64, heads=12, lens=[37]),
    _case("bs16-d64-fp32-b8", bs=16, hd=64, heads=1, lens=[1, 2, 3, 16, 17, 31, 33, 48]),
    _case("bs16-d80-fp32-nonpow2-headdim", bs=16, hd=80, heads=2, lens=[19, 1]),
    _case("bs16-d64-fp32-scale0.3", bs=16, hd=64, heads=2, lens=[23, 9], scale=0.3),
    _case("bs32-d64-fp32-tile16", bs=32, hd=64, heads=2, lens=[1, 31, 33, 100], tile=16),
    _case("bs8-d64-fp32-tile2", bs=8, hd=64, heads=1, lens=[1, 2, 3, 9, 20], tile=2),
    _case("bs16-d64-fp32-strided", bs=16, hd=64, heads=2, lens=[18, 1, 40], layout="strided"),
    _case("bs16-d64-fp32-int64-tables", bs=16, hd=64, heads=2, lens=[18, 5], layout="int64"),
    _case("bs16-d128-fp32-32heads", bs=16, hd=128, heads=32, lens=[5, 18]),
    _case("bs32-d64-fp32-seed1", bs=32, hd=64, heads=2, lens=[3, 77, 161, 12, 96, 1], seed=1),
    _case("bs16-d128-fp16-long", bs=16, hd=128, heads=2, lens=[300, 257, 1], dtype="float16"),
    _case("bs16-d64-fp16", bs=16, hd=64, heads=2, lens=[1, 17, 140], dtype="float16"),
    _case("bs8-d128-fp16", bs=8, hd=128, heads=2, lens=[9, 70], dtype="float16"),
    _case("bs32-d32-fp16", bs=32, hd=32, heads=2, lens=[33, 2], dtype="float16"),
    _case("bs16-d64-bf16", bs=16, hd=64, heads=2, lens=[1, 17, 140], dtype="bfloat16"),
    _case("bs32-d128-bf16", bs=32, hd=128, heads=2, lens=[65, 31], dtype="bfloat16"),
    _case("bs8-d32-bf16", bs=8, hd=32, heads=3, lens=[12, 1], dtype="bfloat16"),
]


# --------------------------------------------------------------------------------------
# Child side: build inputs, run the kernel and the reference. Runs under TRITON_INTERPRET=1.
# --------------------------------------------------------------------------------------


def _build_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    bs, hd, heads = case["block_size"], case["head_dim"], case["num_heads"]
    lens = case["context_lens"]
    batch = len(lens)
    blocks_needed = [(n + bs - 1) // bs for n in lens]
    max_blocks = max(blocks_needed) + 2  # padded tables: extra columns beyond every sequence's need
    num_blocks = sum(blocks_needed) + 3  # a few blocks nobody owns

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)

    # Poison: every slot starts as NaN; only slots inside some context get real values.
    if case["layout"] == "strided":
        # K and V as views into one [num_blocks, 2, bs, H, D] pool, q a slice of fused qkv.
        kv = torch.full((num_blocks, 2, bs, heads, hd), float("nan"), dtype=dtype)
        k_cache, v_cache = kv[:, 0], kv[:, 1]
        qkv = randn(batch, 3, heads, hd)
        q = qkv[:, 0]
        assert not q.is_contiguous() and not k_cache.is_contiguous()
    else:
        k_cache = torch.full((num_blocks, bs, heads, hd), float("nan"), dtype=dtype)
        v_cache = torch.full((num_blocks, bs, heads, hd), float("nan"), dtype=dtype)
        q = randn(batch, heads, hd)

    perm = torch.randperm(num_blocks, generator=gen).tolist()
    owned, rest = perm[: sum(blocks_needed)], perm[sum(blocks_needed) :]
    pad_block = rest[0]  # a valid id whose contents are all NaN
    block_tables = torch.full((batch, max_blocks), pad_block, dtype=torch.int32)
    cursor = 0
    for b, (n, nb) in enumerate(zip(lens, blocks_needed, strict=True)):
        mine = owned[cursor : cursor + nb]
        cursor += nb
        block_tables[b, :nb] = torch.tensor(mine, dtype=torch.int32)
        for i, blk in enumerate(mine):
            used = min(bs, n - i * bs)
            k_cache[blk, :used] = randn(used, heads, hd)
            v_cache[blk, :used] = randn(used, heads, hd)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    if case["layout"] == "int64":
        block_tables, context_lens = block_tables.long(), context_lens.long()
    scale = case["scale"] if case["scale"] is not None else hd**-0.5
    return q, k_cache, v_cache, block_tables, context_lens, scale


def reference_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Naive float64 reference: gather each sequence's blocks, plain softmax."""
    batch, heads, hd = q.shape
    bs = k_cache.shape[1]
    out = torch.empty(batch, heads, hd, dtype=torch.float64)
    for b in range(batch):
        n = int(context_lens[b])
        nb = (n + bs - 1) // bs
        blocks = block_tables[b, :nb].long()
        k = k_cache[blocks].reshape(nb * bs, heads, hd)[:n].double()  # [n, H, D]
        v = v_cache[blocks].reshape(nb * bs, heads, hd)[:n].double()
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)
    return out


def _run_cases(cases):
    from fastserve.services.worker import triton_attention as ta

    assert ta.TRITON_AVAILABLE, "triton must be installed to run these tests"
    assert ta.interpreter_active(), "TRITON_INTERPRET=1 was not in effect when the kernel was defined"
    results = []
    for case in cases:
        q, k_cache, v_cache, block_tables, context_lens, scale = _build_inputs(case)
        out = ta.triton_paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, tile=case["tile"]
        )
        ref = reference_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
        # What an exact result rounded to the output dtype would score: the floor for fp16/bf16.
        rounding_floor = (ref.to(q.dtype).double() - ref).abs().max().item()
        results.append(
            {
                "name": case["name"],
                "shape": list(out.shape),
                "dtype": str(out.dtype).removeprefix("torch."),
                "finite": bool(torch.isfinite(out).all()),
                "max_abs_err": (out.double() - ref).abs().max().item(),
                "rounding_floor": rounding_floor,
            }
        )
    return results


# --------------------------------------------------------------------------------------
# Parent side.
# --------------------------------------------------------------------------------------


def _child_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _run_child(code_or_script_args, *, stdin=None, env=None, timeout=240):
    proc = subprocess.run(
        [sys.executable, *code_or_script_args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=timeout,
    )
    return proc


@pytest.fixture(scope="module")
def interpreter_results():
    proc = _run_child(
        [str(Path(__file__).resolve())],
        stdin=json.dumps(CASES),
        env=_child_env(TRITON_INTERPRET="1"),
    )
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    by_name = {r["name"]: r for r in results}
    # Visible with `pytest -s`; also echoed into the report on failure.
    for r in results:
        print(
            f"{r['name']:34s} {r['dtype']:9s} max_abs_err={r['max_abs_err']:.3e} "
            f"(rounding floor {r['rounding_floor']:.3e})"
        )
    return by_name


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_kernel_matches_reference(interpreter_results, case):
    r = interpreter_results[case["name"]]
    heads, hd = case["num_heads"], case["head_dim"]
    assert r["shape"] == [len(case["context_lens"]), heads, hd]
    assert r["dtype"] == case["dtype"]
    assert r["finite"], "NaN/inf in output: the kernel read a masked or padded cache slot"
    tol = TOLERANCES[case["dtype"]]
    assert r["max_abs_err"] < tol, f"max abs error {r['max_abs_err']:.3e} >= {tol:.1e}"


def test_reference_agrees_with_sdpa():
    """Sanity check of the reference itself against torch SDPA on one sequence."""
    case = _case("ref", bs=8, hd=32, heads=2, lens=[13])
    q, k_cache, v_cache, bt, cl, scale = _build_inputs(case)
    ref = reference_paged_decode_attention(q, k_cache, v_cache, bt, cl, scale)
    blocks = bt[0, :2].long()
    k = k_cache[blocks].reshape(16, 2, 32)[:13].transpose(0, 1)  # [H, n, D]
    v = v_cache[blocks].reshape(16, 2, 32)[:13].transpose(0, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[0][:, None], k, v, scale=scale)[:, 0]
    assert (sdpa.double() - ref[0]).abs().max().item() < 1e-5


def test_import_without_triton_fails_only_when_called():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from fastserve.services.worker import triton_attention as ta\n"
        "assert ta.TRITON_AVAILABLE is False\n"
        "q = torch.zeros(1, 1, 32); kc = torch.zeros(1, 8, 1, 32)\n"
        "try:\n"
        "    ta.triton_paged_decode_attention(q, kc, kc, torch.zeros(1, 1, dtype=torch.int32),\n"
        "                                     torch.ones(1, dtype=torch.int32), 1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e), e\n"
        "    print('OK')\n"
    )
    proc = _run_child(["-c", code], env=_child_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr


def test_cpu_tensors_without_interpreter_give_clear_error():
    env = _child_env()
    env.pop("TRITON_INTERPRET", None)
    code = (
        "import torch\n"
        "from fastserve.services.worker import triton_attention as ta\n"
        "assert ta.TRITON_AVAILABLE and not ta.interpreter_active()\n"
        "q = torch.zeros(1, 1, 32); kc = torch.zeros(1, 8, 1, 32)\n"
        "try:\n"
        "    ta.triton_paged_decode_attention(q, kc, kc, torch.zeros(1, 1, dtype=torch.int32),\n"
        "                                     torch.ones(1, dtype=torch.int32), 1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e), e\n"
        "    print('OK')\n"
    )
    proc = _run_child(["-c", code], env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr


# Ahead-of-time compilation for real GPUs, no GPU needed: the interpreter accepts programs the
# compiler rejects (and the reverse), so compile the exact launch the wrapper makes for
# sm_80 and sm_90 down to a cubin. Arguments are specialised the way triton's JIT does at
# launch (ints equal to 1 become constants, 16-divisible ints and pointers get divisibility
# hints). This uses triton internals; if they move, the child exits 3 and the test skips.
COMPILE_CONFIGS = [
    (dtype, head_dim, block_size)
    for dtype in ("float16", "bfloat16", "float32")
    for head_dim, block_size in ((64, 16), (128, 16), (128, 32), (32, 8))
]

_COMPILE_CHILD = r"""
import json, sys
import torch
try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
except ImportError as exc:
    print(f"triton internals unavailable: {exc!r}")
    sys.exit(3)
from fastserve.services.worker import triton_attention as ta

assert ta.TRITON_AVAILABLE and not ta.interpreter_active()
kernel = ta._paged_decode_attention_kernel
done = []
for dtype, head_dim, block_size in json.loads(sys.argv[1]):
    dt = getattr(torch, dtype)
    q = torch.zeros(4, 8, head_dim, dtype=dt)
    kc = torch.zeros(16, block_size, 8, head_dim, dtype=dt)
    bt = torch.zeros(4, 4, dtype=torch.int32)
    cl = torch.ones(4, dtype=torch.int32)
    _, args, constexprs = ta._launch_args(q, kc, kc, bt, cl, torch.empty_like(q), head_dim**-0.5)
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            consts[(i,)] = constexprs[name]
            continue
        ty, spec = native_specialize_impl(BaseBackend, args[i], False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            consts[(i,)] = args[i]
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    config = ta.launch_config(head_dim)
    for cc in (80, 90):
        compiled = triton_compile(
            ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]},
        )
        assert compiled.asm.get("cubin"), (dtype, head_dim, block_size, cc)
        done.append([dtype, head_dim, block_size, cc])
print(json.dumps(done))
"""


def test_kernel_compiles_for_sm80_and_sm90():
    env = _child_env(TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    proc = _run_child(["-c", _COMPILE_CHILD, json.dumps(COMPILE_CONFIGS)], env=env, timeout=240)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])) == 2 * len(COMPILE_CONFIGS)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must be"),
        (lambda a: {**a, "v_cache": a["v_cache"][:, :4]}, ValueError, "k_cache and v_cache"),
        (lambda a: {**a, "k_cache": a["k_cache"].half(), "v_cache": a["v_cache"].half()}, TypeError, "dtype"),
        (lambda a: {**a, "q": a["q"].double()}, TypeError, "unsupported dtype"),
        (lambda a: {**a, "block_tables": a["block_tables"][:1]}, ValueError, "block_tables"),
        (lambda a: {**a, "context_lens": a["context_lens"].float()}, TypeError, "integer"),
        (lambda a: {**a, "q": a["q"][:, :1]}, ValueError, "do not match"),
    ],
)
def test_input_validation(mutate, exc, match):
    # Validation happens before any launch, so this runs in-process whatever mode triton is in.
    from fastserve.services.worker.triton_attention import triton_paged_decode_attention

    args = {
        "q": torch.zeros(2, 2, 32),
        "k_cache": torch.zeros(4, 8, 2, 32),
        "v_cache": torch.zeros(4, 8, 2, 32),
        "block_tables": torch.zeros(2, 2, dtype=torch.int32),
        "context_lens": torch.ones(2, dtype=torch.int32),
        "scale": 1.0,
    }
    with pytest.raises(exc, match=match):
        triton_paged_decode_attention(**mutate(args))


if __name__ == "__main__":
    # Child mode: cases as JSON on stdin, results as one JSON line on stdout.
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (tests/test_triton_attention.py starts this itself)")
    sys.path.insert(0, str(REPO_ROOT))
    print(json.dumps(_run_cases(json.loads(sys.stdin.read()))))

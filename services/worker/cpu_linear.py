"""Linear layers through oneDNN with weights reordered ("prepacked") once at load time: the CPU path.

Eager ``F.linear`` on CPU hands every call to a BLAS ``sgemm`` that re-lays-out the weight
for its kernel on each call. Decode multiplies a few rows by every weight of the model, so
that per-call copy of the weight is most of the work: on the 2-core EPYC these machines
have, OPT-125m's 12 layers + LM head took 33 / 54 / 61 ms at batch 1 / 4 / 16 in fp32,
where reading the weights once costs the same at every batch. oneDNN's matmul on a weight
reordered once into its blocked layout reads it once per call, at any batch size (the
layout does not depend on the number of rows, so no per-batch-size copies and no compile).
This is what inductor's ``freezing`` does to a compiled graph's linears, and what vLLM's CPU
backend does with its own oneDNN matmul.

The packed tensor is an opaque oneDNN tensor beside the plain weight, which stays for
everything else that reads it (the tied embedding, checkpoints, swapping nothing).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from torch import Tensor

log = logging.getLogger("fastserve.worker.cpu_linear")

# dtypes oneDNN's CPU matmul serves: fp32 everywhere it runs, bf16 on CPUs with avx512_bf16/AMX
_DTYPES = (torch.float32, torch.bfloat16)


def available(weight: Tensor) -> bool:
    """Whether ``weight`` can be packed here: a CPU tensor of a served dtype, oneDNN built in."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in _DTYPES
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack(weight: Tensor) -> Tensor | None:
    """The oneDNN-reordered copy of ``weight`` ``[out, in]``, or None where oneDNN cannot serve it
    (the caller keeps the plain ``F.linear``). Checked once against ``F.linear`` on random rows:
    a build whose packed matmul disagrees is not used."""
    if not available(weight):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        probe = torch.randn(3, weight.shape[1], dtype=weight.dtype)
        got = linear(probe, packed, None)
        want = torch.nn.functional.linear(probe, weight)
    except RuntimeError as exc:  # an op missing from this build, or a shape oneDNN refuses
        log.warning("oneDNN linear unavailable (%s); using F.linear", exc)
        return None
    tolerance = 1e-3 if weight.dtype == torch.float32 else 5e-2
    if not torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance):
        log.warning("oneDNN linear disagrees with F.linear here; using F.linear")
        return None
    return packed


# oneDNN serves a few rows with other kernels than many, and which is faster depends on the CPU:
# all of OPT-125m's linears and its LM head, fp32, 2 threads, took 20.5 / 23.7 / 17.0 / 16.0 ms for
# 1 / 2 / 3 / 4 rows on a 2-core EPYC with AVX-512 (padding 1 or 2 rows to 4 with zeros paid), and
# 27.7 / 29.4 / 29.1 / 33.3 ms on one with AVX2 only, where padding 1 row to 4 took 37.8 ms. So
# `choose_padding` measures it once at start-up: row counts below PAD_TO that run faster padded
# with zeros are, the others run as they are (the extra rows change no row's numbers).
PAD_TO = 4
padded_rows: frozenset[int] = frozenset()  # row counts padded up to PAD_TO (set by choose_padding)


def linear(x: Tensor, packed: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    """``x @ W.T + bias`` (then ``activation``: "none" or "relu", fused) with a weight from `pack`;
    ``x`` is ``[rows, in]``."""
    rows = x.shape[0]
    if rows not in padded_rows:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, activation, [], "")
    padded = x.new_zeros((PAD_TO, x.shape[1]))
    padded[:rows] = x
    return torch.ops.mkldnn._linear_pointwise(padded, packed, bias, activation, [], "")[:rows]


def choose_padding(
    weights: list[tuple[Tensor, Tensor]], rounds: int = 5, budget_bytes: int = 512 << 20
) -> dict[int, tuple[float, float]]:
    """Sets `padded_rows` for this CPU from timed passes over ``weights`` ((weight, packed) pairs,
    the model's in order, as many as fit ``budget_bytes``, so they come from memory as in a step):
    a row count below PAD_TO is padded if its padded pass is faster (passes alternating, medians
    of ``rounds``). Returns row count -> (ms as it is, ms padded)."""
    global padded_rows
    chosen, used = [], 0
    for weight, packed in weights:
        if used >= budget_bytes:
            break
        chosen.append((weight, packed))
        used += weight.nbytes
    timings: dict[int, tuple[float, float]] = {}
    for rows in range(1, PAD_TO):
        pairs = [(_pass_ms(chosen, rows), _pass_ms(chosen, PAD_TO)) for _ in range(rounds)]
        timings[rows] = (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs))
    padded_rows = frozenset(rows for rows, (plain, padded) in timings.items() if padded < plain)
    return timings


def _pass_ms(weights: list[tuple[Tensor, Tensor]], rows: int) -> float:
    """Milliseconds of one matmul of ``rows`` rows by each packed weight."""
    inputs = {(w.shape[1], w.dtype): torch.zeros(rows, w.shape[1], dtype=w.dtype) for w, _ in weights}
    started = time.perf_counter()
    for weight, packed in weights:
        torch.ops.mkldnn._linear_pointwise(
            inputs[weight.shape[1], weight.dtype], packed, None, "none", [], ""
        )
    return (time.perf_counter() - started) * 1000

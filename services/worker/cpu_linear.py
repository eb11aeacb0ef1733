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
everything else that reads it (the tied embedding, checkpoints, swapping nothing). A small
decode batch (1-7 rows) may run another way instead, oneDNN's on padded rows or on the plain
weight, or the C++ loop of cpu_kernels.py that streams the plain weight: `choose_few_rows`
times them at start-up and keeps this CPU's fastest for each row count.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from torch import Tensor

from .cpu_kernels import few_rows_linear

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
        got = _run(probe, weight, packed, None, "none", "packed")
        want = torch.nn.functional.linear(probe, weight)
    except RuntimeError as exc:  # an op missing from this build, or a shape oneDNN refuses
        log.warning("oneDNN linear unavailable (%s); using F.linear", exc)
        return None
    if not _matches(got, want, weight.dtype):
        log.warning("oneDNN linear disagrees with F.linear here; using F.linear")
        return None
    return packed


def _matches(got: Tensor, want: Tensor, dtype: torch.dtype) -> bool:
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    return torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance)


# oneDNN serves a few rows with other kernels than many, and which is fastest depends on the CPU:
# all of OPT-125m's linears and its LM head, fp32, 2 threads, took 20.5 / 23.7 / 17.0 / 16.0 ms for
# 1 / 2 / 3 / 4 rows on a 2-core EPYC with AVX-512 (padding 1 or 2 rows to 4 with zeros paid). On
# one with AVX2 only, 1 row took 27.7 ms on the packed weights and 37.8 padded to 4 rows in one run,
# 32.2 packed and 26.2 on the plain weights in another (oneDNN's matmul takes those too), and the
# C++ kernel of cpu_kernels.py (a streaming read of each weight) 24-25 ms against 36.6 packed at 1
# row, 34.9 against 47.9 at 4, 61.0 against 95.5 at 8 in one run. So `choose_few_rows` times the
# ways once at start-up for every row count below CHOSEN_ROWS.
FEW_ROWS = 4  # the "padded" way pads fewer rows to this many
CHOSEN_ROWS = 8  # row counts below this get a way chosen at start-up; more rows run "packed"
WAYS = ("packed", "padded", "plain", "cpp")
few_rows: dict[int, str] = {}  # row count -> the way that beat "packed" for it
_NO_BIAS = torch.empty(0)


def linear(
    x: Tensor, weight: Tensor, packed: Tensor, bias: Tensor | None, activation: str = "none"
) -> Tensor:
    """``x @ weight.T + bias`` (then ``activation``: "none" or "relu", fused) with ``packed`` from
    `pack`; ``x`` is ``[rows, in]``."""
    return _run(x, weight, packed, bias, activation, few_rows.get(x.shape[0], "packed"))


def _run(x: Tensor, weight: Tensor, packed: Tensor, bias: Tensor | None, activation: str, way: str) -> Tensor:
    """`linear` the given way (one of WAYS)."""
    if way == "packed":
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, activation, [], "")
    if way == "plain":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "")
    if way == "cpp":
        if (kernel := few_rows_linear()) is None:
            raise RuntimeError("the C++ few-row linear is not built here")
        return kernel(x, weight, _NO_BIAS if bias is None else bias, activation == "relu")
    rows = x.shape[0]
    padded = x.new_zeros((FEW_ROWS, x.shape[1]))
    padded[:rows] = x
    return torch.ops.mkldnn._linear_pointwise(padded, packed, bias, activation, [], "")[:rows]


def choose_few_rows(
    weights: list[tuple[Tensor, Tensor]], rounds: int = 5, budget_bytes: int = 256 << 20
) -> dict[int, dict[str, float]]:
    """Sets `few_rows` for this CPU from timed passes over ``weights`` ((weight, packed) pairs, the
    model's in order, as many as fit ``budget_bytes``, so they come from memory as in a step): for
    each row count below CHOSEN_ROWS the fastest of the WAYS that serve it (passes interleaved,
    medians of ``rounds``). Returns row count -> way -> ms."""
    chosen, used = [], 0
    for weight, packed in weights:
        if used >= budget_bytes:
            break
        chosen.append((weight, packed))
        used += weight.nbytes
    timings: dict[int, dict[str, float]] = {}
    ways = [way for way in WAYS if chosen and _agrees(*chosen[0], way)]
    for rows in range(1, CHOSEN_ROWS):
        passes: dict[str, list[float]] = {way: [] for way in ways if way != "padded" or rows < FEW_ROWS}
        for _ in range(rounds):
            for way, ms in passes.items():
                ms.append(_pass_ms(chosen, rows, way))
        timings[rows] = {way: statistics.median(ms) for way, ms in passes.items()}
    few_rows.clear()
    for rows, ms in timings.items():
        if (fastest := min(ms, key=ms.__getitem__)) != "packed":
            few_rows[rows] = fastest
    return timings


def _agrees(weight: Tensor, packed: Tensor, way: str) -> bool:
    """Whether ``way`` computes what ``F.linear`` does here (a build may refuse the plain weight, the
    C++ kernel may be missing or not serve the dtype)."""
    probe = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    try:
        got = _run(probe, weight, packed, None, "none", way)
    except RuntimeError:
        return False
    return _matches(got, torch.nn.functional.linear(probe, weight), weight.dtype)


def _pass_ms(weights: list[tuple[Tensor, Tensor]], rows: int, way: str) -> float:
    """Milliseconds of one matmul of ``rows`` rows by each weight, the ``way`` `linear` would."""
    inputs = {(w.shape[1], w.dtype): torch.zeros(rows, w.shape[1], dtype=w.dtype) for w, _ in weights}
    started = time.perf_counter()
    for weight, packed in weights:
        _run(inputs[weight.shape[1], weight.dtype], weight, packed, None, "none", way)
    return (time.perf_counter() - started) * 1000

"""Iteration time as a linear function of what the batch feeds. Pure Python.

    t = c0 + c_prefill * prefill_tokens + c_decode * decode_seqs + c_ctx * context_tokens

c0 is the fixed cost of an iteration (reading the weights once, launches, RPC);
prefill tokens and decode sequences each cost their share of the matmuls;
context tokens are the KV the attention reads. The live scheduler fits the
coefficients from a start-up profile and refines them from observed iterations;
the simulator takes them from a file, a flag or a preset.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field

Sample = tuple[int, int, int, float]  # prefill tokens, decode seqs, context tokens, seconds
FIELDS = ("c0", "c_prefill", "c_decode", "c_ctx")


class _Normal:
    """Running sums of the weighted normal equations A^T W A, A^T W y for rows (1, p, d, c)."""

    def __init__(self) -> None:
        self.ata = [[0.0] * 4 for _ in range(4)]
        self.aty = [0.0] * 4
        self.count = 0
        self.since_refit = 0

    def add(self, sample: Sample, sign: int) -> None:
        p, d, c, t = sample
        w = 1.0 / max(t, 1e-6) ** 2  # relative error: (t_hat - t) / t
        row = (1.0, float(p), float(d), float(c))
        for i in range(4):
            wi = sign * w * row[i]
            self.aty[i] += wi * t
            ata_i = self.ata[i]
            for j in range(4):
                ata_i[j] += wi * row[j]
        self.count += sign

    def solve(self, cols: list[int], ridge: float) -> list[float]:
        """Least squares over the columns `cols`, Jacobi-scaled (a tiny ridge keeps unseen columns at 0)."""
        scale = [max(self.ata[i][i], 0.0) ** 0.5 or 1.0 for i in cols]
        a = [
            [
                self.ata[i][j] / (si * sj) + (ridge if i == j else 0.0)
                for j, sj in zip(cols, scale, strict=True)
            ]
            for i, si in zip(cols, scale, strict=True)
        ]
        b = [self.aty[i] / si for i, si in zip(cols, scale, strict=True)]
        return [x / si for x, si in zip(_solve(a, b), scale, strict=True)]


@dataclass
class CostModel:
    c0: float = 0.01
    c_prefill: float = 0.0
    c_decode: float = 0.0
    c_ctx: float = 0.0
    # the online window of observed iterations; start-up profile samples (fit) are kept for good
    samples: deque = field(default_factory=lambda: deque(maxlen=512), repr=False, compare=False)
    base_samples: list = field(default_factory=list, init=False, repr=False, compare=False)
    _stats: _Normal = field(default_factory=_Normal, init=False, repr=False, compare=False)

    def time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        return (
            self.c0
            + self.c_prefill * prefill_tokens
            + self.c_decode * decode_seqs
            + self.c_ctx * context_tokens
        )

    def prefill_time(self, num_tokens: int, batch_size: int = 1) -> float:
        """One iteration that prefills `batch_size` prompts of `num_tokens` each."""
        return self.time(num_tokens * batch_size, 0, num_tokens * batch_size)

    def decode_time(self, batch_size: int = 1, context_tokens: int = 0) -> float:
        """One decode iteration of `batch_size` sequences holding `context_tokens` in all."""
        return self.time(0, batch_size, context_tokens)

    def iteration_time(self, batch) -> float:
        """For a list of policy Jobs about to run together (prefills and decodes mixed)."""
        prefill = decode = context = 0
        for job in batch:
            context += job.context_len
            if job.needs_prefill:
                prefill += job.context_len
            else:
                decode += 1
        return self.time(prefill, decode, context)

    # -- fitting ----------------------------------------------------------------------------
    #
    # Relative-error least squares (each row weighted by 1/seconds): iteration times span
    # three orders of magnitude (a decode step vs a 1024-token prefill) and both ends matter
    # (the base quantum, skip-join placement). The normal equations are kept as running
    # sums, so adding a sample is O(1) and a refit is a 4x4 solve, whatever the window.

    def fit(self, samples: list[Sample], ridge: float = 1e-9) -> CostModel:
        """Adds `samples` for good (a start-up profile) and refits on everything held.

        Non-negative: coefficients that come out negative are pinned to zero and the
        rest refitted (an active-set NNLS, enough for four columns).
        """
        for sample in samples:
            self.base_samples.append(sample)
            self._stats.add(sample, +1)
        self.refit(ridge)
        return self

    def observe(self, sample: Sample, refit_every: int = 16) -> None:
        """Adds one live iteration to the sliding window; refits every `refit_every` observations."""
        if self.samples.maxlen is not None and len(self.samples) == self.samples.maxlen:
            self._stats.add(self.samples.popleft(), -1)
        self.samples.append(sample)
        self._stats.add(sample, +1)
        self._stats.since_refit += 1
        if self._stats.since_refit >= refit_every:
            self.refit()

    def refit(self, ridge: float = 1e-9) -> CostModel:
        stats = self._stats
        stats.since_refit = 0
        if stats.count < 2:
            return self
        active = [0, 1, 2, 3]
        while True:
            coef = stats.solve(active, ridge)
            if all(c >= 0 for c in coef) or len(active) == 1:
                break
            active.pop(min(range(len(coef)), key=lambda i: coef[i]))
        values = dict.fromkeys(range(4), 0.0)
        values.update({col: max(c, 0.0) for col, c in zip(active, coef, strict=True)})
        self.c0, self.c_prefill, self.c_decode, self.c_ctx = (values[i] for i in range(4))
        return self

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_coefficients(cls, text: str) -> CostModel:
        """'c0=0.02,c_prefill=1e-4' (unnamed coefficients stay 0)."""
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name not in FIELDS:
                raise ValueError(f"--cost-model: unknown coefficient {name!r}; use {', '.join(FIELDS)}")
            values[name] = float(value)
        return cls(**{name: values.get(name, 0.0) for name in FIELDS})

    @classmethod
    def from_file(cls, path: str) -> CostModel:
        with open(path) as f:
            data = json.load(f)
        return cls(**{name: float(data.get(name, 0.0)) for name in FIELDS})

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in FIELDS}

    def to_file(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def resolve(cls, spec: str) -> CostModel:
        """A preset name, a JSON file, or coefficients."""
        if spec in PRESETS:
            return PRESETS[spec]()
        if spec.endswith(".json"):
            return cls.from_file(spec)
        return cls.from_coefficients(spec)


def opt_13b_a100() -> CostModel:
    """OPT-13B, fp16, one A100-40GB, from bytes and FLOPs per iteration.

    Model: 40 layers, hidden 5120, ~13e9 parameters = 26 GB of fp16 weights.
    Device: 1.555 TB/s HBM, 312 TFLOPS dense fp16 (tensor cores).
    Stated efficiencies: 80% of the HBM bandwidth for streaming weights and KV,
    50% of the fp16 peak for the matmuls.

    - c0 = 26e9 B / (0.8 * 1.555e12 B/s) = 20.9 ms: every iteration reads all weights once
      (the whole cost of a batch-1 decode step, which is memory bound).
    - c_prefill = c_decode = 2 * 13e9 FLOP / (0.5 * 312e12 FLOP/s) = 0.167 ms per token fed
      (a 161-token prompt: +27 ms; 1024 tokens: +171 ms).
    - c_ctx = 2 (K, V) * 40 layers * 5120 * 2 B = 819 200 B per context token,
      / (0.8 * 1.555e12) = 0.66 us: attention reads (decode) or writes (prefill) each cached token.

    Simplifications, both small at these sizes: memory and compute time are added, not
    overlapped (a roofline would take the max; at batch 16 the sum is 13% above it), and
    the quadratic attention FLOPs of a prefill are left out (3% of a 1024-token prefill).
    Resulting times: decode batch 1 = 21.1 ms, decode batch 16 at 500 tokens each = 28.8 ms,
    prefill of 161 tokens = 47.8 ms, of 1024 tokens = 192 ms.
    """
    bandwidth, flops = 0.8 * 1.555e12, 0.5 * 312e12
    per_token = 2 * 13e9 / flops
    return CostModel(
        c0=26e9 / bandwidth, c_prefill=per_token, c_decode=per_token, c_ctx=2 * 40 * 5120 * 2 / bandwidth
    )


PRESETS = {"opt-13b-a100": opt_13b_a100}


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-300:
            continue
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] if abs(m[i][i]) > 1e-300 else 0.0 for i in range(n)]

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
from dataclasses import asdict, dataclass, field

Sample = tuple[int, int, int, float]  # prefill tokens, decode seqs, context tokens, seconds
FIELDS = ("c0", "c_prefill", "c_decode", "c_ctx")


@dataclass
class CostModel:
    c0: float = 0.01
    c_prefill: float = 0.0
    c_decode: float = 0.0
    c_ctx: float = 0.0
    samples: deque = field(default_factory=lambda: deque(maxlen=512), repr=False, compare=False)

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
        return self.time(0, batch_size, context_tokens)

    def iteration_time(self, batch) -> float:
        """For a list of policy Jobs about to run together."""
        prefill = sum(j.context_len for j in batch if j.needs_prefill)
        decode = sum(1 for j in batch if not j.needs_prefill)
        return self.time(prefill, decode, sum(j.context_len for j in batch))

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, samples: list[Sample], ridge: float = 1e-9) -> CostModel:
        """Non-negative least squares over all samples seen (a small ridge: profiles leave columns collinear).

        Coefficients that come out negative are pinned to zero and the rest refitted
        (an active-set NNLS, enough for four columns).
        """
        self.samples.extend(samples)
        if len(self.samples) < 2:
            return self
        rows = [(1.0, float(p), float(d), float(c)) for p, d, c, _ in self.samples]
        ys = [t for *_, t in self.samples]
        active = [0, 1, 2, 3]
        while True:
            coef = _least_squares([[r[i] for i in active] for r in rows], ys, ridge)
            if all(c >= 0 for c in coef) or len(active) == 1:
                break
            active.pop(min(range(len(coef)), key=lambda i: coef[i]))
        values = dict.fromkeys(range(4), 0.0)
        values.update({col: max(c, 0.0) for col, c in zip(active, coef, strict=True)})
        self.c0, self.c_prefill, self.c_decode, self.c_ctx = (values[i] for i in range(4))
        return self

    def observe(self, sample: Sample, refit_every: int = 64) -> None:
        """Adds a live iteration; refits every `refit_every` observations."""
        self.samples.append(sample)
        if len(self.samples) % refit_every == 0:
            self.fit([])

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
        return {k: v for k, v in asdict(self).items() if k in FIELDS}

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

    Stated efficiencies: 80% of the 1.555 TB/s HBM bandwidth for reading weights and
    KV, 50% of the 312 TFLOPS fp16 peak for the matmuls.
    - c0: the 26 GB of weights read once per iteration: 26e9 / (0.8 * 1.555e12) = 20.9 ms
    - c_prefill = c_decode: 2 * 13e9 FLOPs per token / (0.5 * 312e12) = 0.167 ms
    - c_ctx: KV bytes per context token, 2 (K, V) * 40 layers * 5120 * 2 bytes = 819 kB,
      / (0.8 * 1.555e12) = 0.66 us (attention reads every cached token once)
    """
    bandwidth, flops = 0.8 * 1.555e12, 0.5 * 312e12
    per_token = 2 * 13e9 / flops
    return CostModel(
        c0=26e9 / bandwidth, c_prefill=per_token, c_decode=per_token, c_ctx=2 * 40 * 5120 * 2 / bandwidth
    )


PRESETS = {"opt-13b-a100": opt_13b_a100}


def _least_squares(rows: list[list[float]], ys: list[float], ridge: float) -> list[float]:
    k = len(rows[0])
    scale = [max(max(abs(r[i]) for r in rows), 1e-30) for i in range(k)]  # conditions the normal equations
    rows = [[r[i] / scale[i] for i in range(k)] for r in rows]
    ata = [[sum(r[i] * r[j] for r in rows) + (ridge if i == j else 0.0) for j in range(k)] for i in range(k)]
    aty = [sum(r[i] * y for r, y in zip(rows, ys, strict=True)) for i in range(k)]
    return [c / scale[i] for i, c in enumerate(_solve(ata, aty))]


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

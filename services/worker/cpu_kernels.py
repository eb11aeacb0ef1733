"""The worker's C++ kernels for the CPU path, compiled together once per CPU.

``paged_decode(q, k_cache, v_cache, tables, lens, scale)``: decode attention, one query token per
sequence, its keys and values read where they lie in the KV pool. The torch path
(``attention.paged_decode_attention``) gathers each sequence's blocks into a dense buffer and runs
a masked SDPA over it: every K/V byte is copied once and read twice, and each layer costs a
handful of ops per chunk of sequences (profiled live at batch 16, a third of the decode step).
This kernel walks the block table instead, reading every cached K and V byte once, in one
parallel region per layer (``at::parallel_for``, the same OpenMP threads as the rest of the step).

``few_rows_linear(x, weight, bias, relu)``: ``x @ weight.T + bias`` for the few rows of a small
decode batch. With one to a few rows a linear is a read of its weight and little arithmetic;
this reads each weight row once, multiplying it by every input row while it is in cache, at the
speed the memory streams (all of OPT-125m's linears and LM head at 1 row, 2 threads, a 2-core
AVX2 EPYC: 24-25 ms, as long as summing the weights takes, against 27-37 ms for oneDNN's matmul on
its prepacked copy). ``cpu_linear.choose_few_rows`` times it beside oneDNN's ways at start-up and
keeps whichever this CPU runs fastest for each row count.

They are compiled when a runner starts, with ``torch.utils.cpp_extension.load_inline`` (a C++
compiler is needed; the build is cached under ``TORCH_EXTENSIONS_DIR``, ~1 min the first time,
one build per CPU model and instruction set: it is compiled with ``-march=native``, and a build
copied to an older CPU would die of an illegal instruction) and serve fp32. Where they cannot be
built, `paged_decode` and `few_rows_linear` return None: the torch attention and oneDNN's linears
serve.

    python -m fastserve.services.worker.cpu_kernels   # builds them (./dev does, on set-up)
"""

from __future__ import annotations

import hashlib
import logging
import platform
import sys
import threading
from collections.abc import Callable

from torch import Tensor

log = logging.getLogger("fastserve.worker.cpu_kernels")

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

// q [B, H, D]; k_cache, v_cache [num_blocks, block_size, H, D]; tables int32 [B, max_blocks];
// lens int32 [B] (context including the current token). Returns [B, H, D].
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k_cache.scalar_type() == torch::kFloat, "fp32 only");
  TORCH_CHECK(tables.scalar_type() == torch::kInt && lens.scalar_type() == torch::kInt, "int32 tables");
  q = q.contiguous();
  tables = tables.contiguous();
  lens = lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous pools");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), width = tables.size(1), num_blocks = k_cache.size(0);
  TORCH_CHECK(k_cache.size(2) == H && k_cache.size(3) == D && tables.size(0) == B && lens.size(0) == B);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t token_stride = H * D;  // floats between consecutive slots of the pool
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * bs, "context length outside the block table");
    for (int64_t j = 0; j < (lp[b] + bs - 1) / bs; ++j)
      TORCH_CHECK(tp[b * width + j] >= 0 && tp[b * width + j] < num_blocks, "block id outside the pool");
  }
  // Work items are (sequence, run of tokens), all heads of each token: the keys and values are
  // read token by token, each token's H * D floats contiguous in the pool (a streaming read).
  // A sequence longer than its share of the batch's tokens is split into runs, so that a batch
  // smaller than the thread count, or one long context among short ones, still gives every
  // thread work; each run keeps its softmax's max and sum, and the runs of a sequence are merged
  // after the parallel region (split-K, as flash-decoding does on GPUs). Splitting by heads
  // instead reads part of every token and streams badly (12 layers at context 512 on a 2-thread
  // AVX2 EPYC: one sequence in 2 groups of 6 heads took 4.5-5.2 ms, in 4 runs of tokens 2.6-2.8).
  // Each thread takes the next item when it is done with one: split into fixed runs, a batch
  // whose long contexts came first (as a priority order often has them) left one thread with
  // most of the work. Runs never start mid-block and are at least kMinRun tokens long.
  constexpr int64_t kMinRun = 64;
  const int64_t threads = at::get_num_threads();
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += lp[b];
  int64_t run = std::max<int64_t>(kMinRun, (total + 2 * threads - 1) / (2 * threads));
  run = (run + bs - 1) / bs * bs;
  std::vector<int64_t> first(B + 1, 0);  // items of sequence b: first[b] .. first[b + 1] - 1
  for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + (lp[b] + run - 1) / run;
  const int64_t items = first[B];
  std::vector<int64_t> item_seq(items);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = first[b]; i < first[b + 1]; ++i) item_seq[i] = b;
  // per item and head: the scores' max, the sum of their exponentials, the unnormalised output
  std::vector<float> run_max(items * H), run_sum(items * H), run_acc(items * H * D);
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, std::min(threads, items), 1, [&](int64_t, int64_t) {
    std::vector<float> scores;
    for (int64_t i; (i = next_item.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t b = item_seq[i];
      const int64_t t0 = (i - first[b]) * run, t1 = std::min<int64_t>(lp[b], t0 + run), n = t1 - t0;
      const float* qv = qp + b * H * D;
      const int32_t* table = tp + b * width;
      scores.resize(H * n);
      for (int64_t t = t0; t < t1; ++t) {
        const float* kv = kp + (static_cast<int64_t>(table[t / bs]) * bs + t % bs) * token_stride;
        for (int64_t h = 0; h < H; ++h) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qv[h * D + d] * kv[h * D + d];
          scores[h * n + t - t0] = dot * sc;
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        float* row = scores.data() + h * n;
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) best = row[t] > best ? row[t] : best;
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          row[t] = std::exp(row[t] - best);
          sum += row[t];
        }
        run_max[i * H + h] = best;
        run_sum[i * H + h] = sum;
      }
      float* acc = run_acc.data() + i * H * D;
      for (int64_t t = t0; t < t1; ++t) {
        const float* vv = vp + (static_cast<int64_t>(table[t / bs]) * bs + t % bs) * token_stride;
        for (int64_t h = 0; h < H; ++h) {
          const float p = scores[h * n + t - t0];
          float* a = acc + h * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * vv[h * D + d];
        }
      }
    }
  });
  // merge each sequence's runs: rescale every run to the largest max, then normalise
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t i = first[b]; i < first[b + 1]; ++i) best = std::max(best, run_max[i * H + h]);
      float sum = 0.f;
      float* o = op + (b * H + h) * D;
      std::fill(o, o + D, 0.f);
      for (int64_t i = first[b]; i < first[b + 1]; ++i) {
        const float w = std::exp(run_max[i * H + h] - best);
        sum += w * run_sum[i * H + h];
        const float* a = run_acc.data() + (i * H + h) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  }
  return out;
}

// x [M, K]; weight [N, K]; bias [N] or empty. Returns x @ weight.T + bias, [M, N], clamped at 0
// with relu. Each thread takes runs of four weight rows; each run is read from memory once and
// multiplied by the input rows two at a time while it is in cache (eight sums in flight, each
// vectorised along K), so a few rows cost about one read of the weight.
torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, bool relu) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "bad shapes");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "fp32 only");
  TORCH_CHECK(weight.is_contiguous(), "contiguous weight");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat && bias.numel() == N), "bias of [out] fp32");
  x = x.contiguous();
  if (has_bias) bias = bias.contiguous();
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  auto store = [&](int64_t m, int64_t n, float sum) {
    const float y = sum + (has_bias ? bp[n] : 0.f);
    op[m * N + n] = relu && y < 0.f ? 0.f : y;
  };
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n = q * 4, rows = std::min<int64_t>(4, N - n);
      // a short last run repeats its last row; the repeated sums are not stored
      const float* w0 = wp + n * K;
      const float* w1 = wp + (n + std::min<int64_t>(1, rows - 1)) * K;
      const float* w2 = wp + (n + std::min<int64_t>(2, rows - 1)) * K;
      const float* w3 = wp + (n + std::min<int64_t>(3, rows - 1)) * K;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) {
        const float* x0 = xp + m * K;
        const float* x1 = x0 + K;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
        for (int64_t k = 0; k < K; ++k) {
          const float u = x0[k], v = x1[k];
          a0 += u * w0[k]; a1 += u * w1[k]; a2 += u * w2[k]; a3 += u * w3[k];
          b0 += v * w0[k]; b1 += v * w1[k]; b2 += v * w2[k]; b3 += v * w3[k];
        }
        const float a[4] = {a0, a1, a2, a3}, b[4] = {b0, b1, b2, b3};
        for (int64_t j = 0; j < rows; ++j) {
          store(m, n + j, a[j]);
          store(m + 1, n + j, b[j]);
        }
      }
      if (m < M) {
        const float* x0 = xp + m * K;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t k = 0; k < K; ++k) {
          const float u = x0[k];
          a0 += u * w0[k]; a1 += u * w1[k]; a2 += u * w2[k]; a3 += u * w3[k];
        }
        const float a[4] = {a0, a1, a2, a3};
        for (int64_t j = 0; j < rows; ++j) store(m, n + j, a[j]);
      }
    }
  });
  return out;
}
"""

_lock = threading.Lock()
_module: object | None | bool = False  # False: not tried yet; None: unavailable


def _kernels() -> object | None:
    """The compiled module, or None where it cannot be built here. Built (or loaded from the
    cache) once per process; afterwards no lock is taken (`cpu_linear` asks on every call)."""
    global _module
    if _module is False:
        with _lock:
            if _module is False:
                _module = _build()
    return _module


def paged_decode() -> Callable[..., Tensor] | None:
    """``paged_decode(q, k_cache, v_cache, tables, lens, scale)``, or None where it cannot be built."""
    module = _kernels()
    return None if module is None else module.paged_decode


def few_rows_linear() -> Callable[..., Tensor] | None:
    """``few_rows_linear(x, weight, bias, relu)``, or None where it cannot be built."""
    module = _kernels()
    return None if module is None else module.few_rows_linear


def cpu_signature(cpuinfo: str | None = None) -> str:
    """Eight hex digits naming this CPU's model and instruction set: what ``-march=native`` compiles for.

    ``cpuinfo`` is /proc/cpuinfo's text (read when None); where there is none, the platform's names."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    wanted = ("vendor_id", "cpu family", "model", "model name", "flags")
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in wanted and key not in fields:  # the first processor's
            fields[key] = " ".join(value.split())
    text = repr(sorted(fields.items())) if fields else f"{platform.machine()} {platform.processor()}"
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _build() -> object | None:
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(
            name=f"fastserve_cpu_kernels_{cpu_signature()}",
            cpp_sources=SOURCE,
            functions=["paged_decode", "few_rows_linear"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers, a failed build: the torch path serves
        log.warning(
            "C++ CPU kernels unavailable (%s); the torch attention and oneDNN serve", str(exc).splitlines()[0]
        )
        return None
    log.info("C++ CPU kernels built")
    return module


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(0 if _kernels() is not None else 1)

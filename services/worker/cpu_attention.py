"""Paged decode attention on CPU in C++: one query token per sequence, its keys and values read
where they lie in the KV pool, without copying them out first.

The torch path (``attention.paged_decode_attention``) gathers each sequence's blocks into a
dense buffer and runs a masked SDPA over it: every K/V byte is copied once and read twice, and
each layer costs a handful of ops per chunk of sequences. Profiled live at batch 16 it was a
third of the worker's decode step. This kernel walks the block table instead: per sequence and
group of heads it scores the query against each cached key, takes the softmax and sums the
values, reading every cached K and V byte once, in one parallel region per layer
(``at::parallel_for``, the same OpenMP threads as the rest of the step).

It is compiled when a runner starts, with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler is
needed; the build is cached under ``TORCH_EXTENSIONS_DIR``, ~1 min the first time, one build per
CPU model and instruction set: it is compiled with ``-march=native``, and a build copied to an
older CPU would die of an illegal instruction) and serves
fp32 pools. Where it cannot be built, `kernel()` returns None and the torch path runs; the
worker's ``--cpu-attention torch`` does not build it at all.

    python -m fastserve.services.worker.cpu_attention   # builds it (./dev does, on set-up)
"""

from __future__ import annotations

import hashlib
import logging
import platform
import sys
import threading
from collections.abc import Callable

from torch import Tensor

log = logging.getLogger("fastserve.worker.cpu_attention")

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
  // Work items are (sequence, group of heads). Within one, the keys are read token by token,
  // each token's heads of the group contiguous in the pool (a streaming read), rather than one
  // head's 256 bytes at a stride of H * D floats, which the prefetcher follows badly. A batch
  // smaller than the thread count splits its heads into just enough groups for every thread to
  // have work: a group reads part of each token, and the finer the split the worse it streams
  // (12 layers at context 512 on a 2-thread AVX2 EPYC: 3 sequences in 6 items of 6 heads took 24.1
  // ms, in 3 whole-token items 14.2, although one thread then does two). Each thread takes the
  // next item when it is done with one: split into fixed runs, a batch whose long contexts came
  // first (as a priority order often has them) left one thread with most of the work (8 jobs,
  // 4 of 300 tokens then 4 of 50: 262 us a layer against 152 us with the same jobs interleaved).
  const int64_t threads = at::get_num_threads();
  const int64_t groups = std::min<int64_t>(H, std::max<int64_t>(1, (threads + B - 1) / B));
  const int64_t per_group = (H + groups - 1) / groups;
  const int64_t items = B * groups;
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, std::min(threads, items), 1, [&](int64_t, int64_t) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t i; (i = next_item.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t b = i / groups, h0 = (i % groups) * per_group;
      const int64_t h1 = std::min<int64_t>(H, h0 + per_group), nh = h1 - h0;
      if (nh <= 0) continue;
      const int64_t n = lp[b];
      const float* qv = qp + (b * H + h0) * D;
      const int32_t* table = tp + b * width;
      scores.resize(nh * n);
      for (int64_t t = 0; t < n; ++t) {
        const float* kv = kp + (static_cast<int64_t>(table[t / bs]) * bs + t % bs) * token_stride + h0 * D;
        for (int64_t h = 0; h < nh; ++h) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qv[h * D + d] * kv[h * D + d];
          scores[h * n + t] = dot * sc;
        }
      }
      for (int64_t h = 0; h < nh; ++h) {
        float* row = scores.data() + h * n;
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) best = row[t] > best ? row[t] : best;
        float total = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          row[t] = std::exp(row[t] - best);
          total += row[t];
        }
        const float inv = 1.f / total;
        for (int64_t t = 0; t < n; ++t) row[t] *= inv;
      }
      acc.assign(nh * D, 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const float* vv = vp + (static_cast<int64_t>(table[t / bs]) * bs + t % bs) * token_stride + h0 * D;
        for (int64_t h = 0; h < nh; ++h) {
          const float p = scores[h * n + t];
          float* a = acc.data() + h * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * vv[h * D + d];
        }
      }
      std::copy(acc.begin(), acc.end(), op + (b * H + h0) * D);
    }
  });
  return out;
}
"""

_lock = threading.Lock()
_kernel: Callable[..., Tensor] | None | bool = False  # False: not tried yet; None: unavailable


def kernel() -> Callable[..., Tensor] | None:
    """The compiled ``paged_decode(q, k_cache, v_cache, tables, lens, scale)``, or None where it
    cannot be built here. Built (or loaded from the cache) once per process."""
    global _kernel
    with _lock:
        if _kernel is False:
            _kernel = _build()
    return _kernel


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


def _build() -> Callable[..., Tensor] | None:
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(
            name=f"fastserve_cpu_paged_decode_{cpu_signature()}",
            cpp_sources=SOURCE,
            functions=["paged_decode"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers, a failed build: the torch path serves
        log.warning("C++ decode attention unavailable (%s); using the torch path", str(exc).splitlines()[0])
        return None
    log.info("C++ decode attention built")
    return module.paged_decode


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(0 if kernel() is not None else 1)

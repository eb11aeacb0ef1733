"""The KV manager's Prometheus metrics, read from its block tables when scraped.

vLLM's names and model_name label: `kv_cache_usage_perc` (GPU tier), `cpu_cache_usage_perc`
(host tier), `num_requests_swapped` (jobs whose KV is on the host tier only); prefix fastserve:.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fastserve.metrics import PREFIX

from .block_manager import BlockManager


class KVCollector(Collector):
    def __init__(self, blocks: Callable[[], BlockManager | None], model_name: str) -> None:
        self.blocks = blocks
        self.model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily]:
        b = self.blocks()
        gpu_total, host_total = (b.num_gpu_blocks, b.host.size) if b else (0, 0)
        values = {
            "kv_cache_usage_perc": (
                "GPU KV-cache usage: 1 means every block is in use",
                1 - b.num_free / gpu_total if gpu_total else 0.0,
            ),
            "cpu_cache_usage_perc": (
                "Host (swap) KV-cache usage: 1 means every block is in use",
                1 - b.num_host_free / host_total if host_total else 0.0,
            ),
            "num_requests_swapped": (
                "Jobs whose KV cache is swapped out to host memory",
                sum(1 for job in b.host_tables if job not in b.tables) if b else 0,
            ),
        }
        for name, (doc, value) in values.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family

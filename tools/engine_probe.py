"""What a bench engine's model-running process spent, turn by turn (benchmarks only).

Installed into the worker over ``LLM.collective_rpc`` (the process and thread that run the
model: vLLM's engine core with one GPU, the worker process on CPU), read before and after
each timed turn. Every engine gets it, `off` included, so the numbers compare modes:
  - ``gc_s``, ``gc_collections``: Python's garbage collector, all generations, in that process;
  - ``thread_cpu_s``: CPU time of the thread running the model (vLLM's engine loop);
  - ``process_cpu_s``: CPU time of the whole process (the loop, otel-moe's publishing thread, ...).
"""
from __future__ import annotations

import gc
import time

_gc = {"s": 0.0, "n": 0, "started": 0.0}


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc["started"] = time.perf_counter()
    else:
        _gc["s"] += time.perf_counter() - _gc["started"]
        _gc["n"] += 1


def install(worker) -> bool:
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
    return True


def read(worker) -> dict:
    return {"gc_s": _gc["s"], "gc_collections": _gc["n"], "thread_cpu_s": time.thread_time(),
            "process_cpu_s": time.process_time()}


def spent(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before[k], 4) for k in before}

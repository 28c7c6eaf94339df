"""What a bench engine's model-running process spent, turn by turn (benchmarks only).

Installed into the worker over ``LLM.collective_rpc`` (the process and thread that run the
model: vLLM's engine core with one GPU, the worker process on CPU), read before and after
each timed turn. Every engine gets it, `off` included, so the numbers compare modes:
  - ``gc_s``, ``gc_collections``: Python's garbage collector, all generations, in that process;
  - ``thread_cpu_s``: CPU time of the thread running the model (vLLM's engine loop);
  - ``process_cpu_s``: CPU time of the whole process (the loop, vLLM's other threads).
And, for one short turn on a GPU, the torch profiler around it (``profile_start``,
``profile_stop``): how busy the GPU was, how many kernels it ran, where the engine thread
waited on it, which host calls took longest. Every engine profiled alike, so the modes'
differences are otel-moe's (the profiler's own cost is in all of them).
"""
from __future__ import annotations

import collections
import gc
import json
import os
import tempfile
import threading
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


_profiler = {}
DEVICE_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset")


def profile_start(worker) -> bool:
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    _profiler.update(profiler=profiler, thread=threading.get_native_id(), started=time.perf_counter())
    return True


def profile_stop(worker) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profiler = _profiler.pop("profiler")
    wall_s = time.perf_counter() - _profiler["started"]
    profiler.stop()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as trace:
            events = json.load(trace)["traceEvents"]
    return summarize_trace(events, _profiler["thread"], wall_s)


def summarize_trace(events: list[dict], engine_thread: int, wall_s: float) -> dict:
    """A profiled turn in a few numbers (microseconds unless named otherwise)."""
    from otel_moe.schema import TELEMETRY_RANGE

    device = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in DEVICE_ACTIVITY)
    busy, end = 0.0, float("-inf")
    for start, stop in device:  # the union of the device's activity
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = device[-1][1] - device[0][0] if device else 0.0
    ops_per_thread = collections.Counter(e.get("tid") for e in events if e.get("cat") == "cpu_op")
    if engine_thread not in ops_per_thread and ops_per_thread:  # the trace numbers threads its own way
        engine_thread = ops_per_thread.most_common(1)[0][0]
    host = _host_time([e for e in events if e.get("tid") == engine_thread])
    others = _host_time([e for e in events if e.get("tid") != engine_thread])
    return {
        "wall_s": round(wall_s, 3), "device_span_us": round(span), "device_busy_us": round(busy),
        "device_busy_share": round(busy / span, 4) if span else None,
        "kernels": sum(e.get("cat") == "kernel" for e in events),
        "device_copies": sum(e.get("cat") == "gpu_memcpy" for e in events),
        "graph_launches": host["runtime"].get("cudaGraphLaunch", [0])[0],
        "otel_moe_telemetry_us": host["ops"].get(TELEMETRY_RANGE, [0, 0]),
        "engine_thread": host, "other_threads": others,
    }


def _host_time(events: list[dict], top: int = 20) -> dict:
    """{"runtime": CUDA runtime calls, "ops": torch ops and ranges}: name -> [calls, total us], the top few."""
    totals = {"runtime": collections.Counter(), "ops": collections.Counter()}
    calls = collections.Counter()
    for e in events:
        kind = {"cuda_runtime": "runtime", "cuda_driver": "runtime", "cpu_op": "ops",
                "user_annotation": "ops"}.get(e.get("cat"))  # user_annotation: otel_moe.telemetry, ...
        if kind and e.get("ph") == "X":
            name = e["name"].split(" ", 1)[0] if e["name"].startswith("otel_moe.") else e["name"]  # one per step, layer
            totals[kind][name] += e.get("dur", 0)
            calls[name] += 1
    return {kind: {name: [calls[name], round(us)] for name, us in counter.most_common(top)}
            for kind, counter in totals.items()}

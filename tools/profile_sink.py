"""Host cost of recording one engine step, without vLLM: a synthetic decode step of
256 requests x 12 layers x top-4 of 60 experts through the engine-thread part (snapshot,
enqueue) and the sink-thread part (layout, record, OTLP spans; the exporter discards).

    python tools/profile_sink.py [--profile]
"""
import cProfile
import pstats
import sys
import time

import torch
from opentelemetry.sdk.trace.export import SpanExportResult

from otel_moe.capture import RoutingBuffers
from otel_moe.config import from_env
from otel_moe.recorder import StepRecorder
from otel_moe.sinks.otlp import OtlpSink
from otel_moe.step import StepInputs

REQUESTS, LAYERS, TOP_K, EXPERTS, STEPS = 256, 12, 4, 60, 300


class Discard:
    def export(self, spans):
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


class _New:
    def __init__(self, i):
        self.req_id, self.num_computed_tokens, self.prompt_token_ids = f"{i}-abcdef12", 0, [1] * 128


class _Cached:
    def __init__(self, ids, computed):
        self.req_ids, self.num_computed_tokens = ids, computed


class _SchedulerOutput:
    def __init__(self, step, ids):
        self.scheduled_new_reqs = [_New(i) for i in range(REQUESTS)] if step == 0 else []
        self.scheduled_cached_reqs = _Cached([] if step == 0 else ids, [] if step == 0 else [128 + step] * REQUESTS)
        self.num_scheduled_tokens = {r: 1 for r in ids}
        self.total_num_scheduled_tokens = REQUESTS
        self.finished_req_ids = set()


def main() -> None:
    config = from_env({"VLLM_LOG_MOE": "otlp"})
    sink = OtlpSink(config, {}, exporter=Discard())
    buffers = RoutingBuffers(list(range(LAYERS)), 8192, TOP_K, EXPERTS, "cpu")
    buffers.ids[:REQUESTS] = torch.randint(0, EXPERTS, (REQUESTS, LAYERS, TOP_K), dtype=torch.int32)
    buffers.weights[:REQUESTS] = torch.rand(REQUESTS, LAYERS, TOP_K)
    recorder = StepRecorder(buffers, config, sink)
    ids = [f"{i}-abcdef12" for i in range(REQUESTS)]
    outputs = [_SchedulerOutput(s, ids) for s in range(STEPS)]
    t0 = time.perf_counter()
    items = []
    for out in outputs:  # what the engine thread does per step
        inputs = StepInputs.take(out, ids)
        recorder.tracker.learn(inputs)
        items.append((0, inputs, recorder.snapshotter.take(out.total_num_scheduled_tokens), 0, 1, 0, 0))
    engine_us = (time.perf_counter() - t0) / STEPS * 1e6
    profiler = cProfile.Profile() if "--profile" in sys.argv else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    for item in items:  # what the sink thread does per step
        sink.write(recorder._record(*item))
    if profiler:
        profiler.disable()
    sink_us = (time.perf_counter() - t0) / STEPS * 1e6
    print(f"engine thread {engine_us:.0f} us/step, sink thread {sink_us:.0f} us/step"
          f"{' (profiled)' if profiler else ''}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()

"""Host cost of recording one engine step in vLLM's process, without vLLM: synthetic decode
steps of 256 requests x 12 layers x top-4 of 60 experts through the engine-thread part
(begin_step, on_step: the ring copy and the hand-off), with a real exporter process
behind it writing JSONL to /dev/null. What the exporter does costs vLLM's process nothing.

    python tools/profile_sink.py [--profile] [--mode tokens|counts]
"""
import cProfile
import pstats
import sys
import time

import torch

from otel_moe.capture import RoutingBuffers
from otel_moe.config import from_env
from otel_moe.exporter.link import ExporterLink
from otel_moe.recorder import StepRecorder

REQUESTS, LAYERS, TOP_K, EXPERTS, STEPS = 256, 12, 4, 60, 2000


class _New:
    def __init__(self, i):
        self.req_id, self.num_computed_tokens, self.prompt_token_ids = f"{i}-abcdef12", 0, [1] * 128


class _Cached:
    def __init__(self, ids, computed):
        self.req_ids, self.num_computed_tokens = ids, computed


class SchedulerOutput:
    """The fields of vLLM's SchedulerOutput that otel-moe reads: step 0 starts every
    request, later steps decode one token of each."""

    def __init__(self, step, ids):
        self.scheduled_new_reqs = [_New(i) for i in range(REQUESTS)] if step == 0 else []
        self.scheduled_cached_reqs = _Cached([] if step == 0 else ids, [] if step == 0 else [128 + step] * REQUESTS)
        self.num_scheduled_tokens = {r: 1 for r in ids}
        self.total_num_scheduled_tokens = REQUESTS
        self.finished_req_ids = set()


class ChurningSteps:
    """Steady serving: every request decodes one token a step for LIFETIME steps; each
    step CHURN requests finish and CHURN new ones arrive with their whole prompt."""

    LIFETIME, CHURN, PROMPT = 64, 4, 128

    def __init__(self) -> None:
        self.next_id = 0
        self.live: dict[str, int] = {}  # request id -> tokens computed

    def step(self):
        out = SchedulerOutput.__new__(SchedulerOutput)
        finished = [r for r, done in self.live.items() if done >= self.PROMPT + self.LIFETIME][: self.CHURN]
        for r in finished:
            del self.live[r]
        cached = list(self.live)
        out.scheduled_cached_reqs = _Cached(cached, [self.live[r] for r in cached])
        out.scheduled_new_reqs = [_New(self.next_id + i) for i in range(self.CHURN)]
        self.next_id += self.CHURN
        out.num_scheduled_tokens = {r: 1 for r in cached}
        out.num_scheduled_tokens.update((n.req_id, self.PROMPT) for n in out.scheduled_new_reqs)
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        out.finished_req_ids = set(finished)
        for r in cached:
            self.live[r] += 1
        for n in out.scheduled_new_reqs:
            self.live[n.req_id] = self.PROMPT
        return out, list(out.num_scheduled_tokens)


def synthetic_recorder(mode: str, destinations: list[str], max_tokens: int = 8192) -> StepRecorder:
    """A recorder over random routing (12 layers, top-4 of 60) with a real exporter process."""
    config = from_env({"VLLM_LOG_MOE": ",".join(destinations), "VLLM_LOG_MOE_MODE": mode})
    buffers = RoutingBuffers(list(range(LAYERS)), max_tokens, TOP_K, EXPERTS, "cpu")
    if mode == "counts":
        buffers.enable_counts()
    for slot in range(LAYERS):  # one forward's routing, as the routers write it
        buffers.ids_writer(slot)(torch.randint(0, EXPERTS, (max_tokens, TOP_K)))
        buffers.weights_writer(slot)(torch.rand(max_tokens, TOP_K))
    link = ExporterLink({"destinations": list(config.destinations), "mode": mode, "resource": {}, "top_k": TOP_K,
                         "num_experts": EXPERTS, "dp_rank": 0, "randomized_request_ids": True},
                        ring_bytes=64 << 20, backlog_messages=256)
    return StepRecorder(buffers, config, link)


def engine_thread_us(mode: str, profiler=None) -> tuple[float, int]:
    recorder = synthetic_recorder(mode, ["/dev/null"])
    ids = [f"{i}-abcdef12" for i in range(REQUESTS)]
    outputs = [SchedulerOutput(s, ids) for s in range(STEPS)]
    if profiler:
        profiler.enable()
    t0 = time.perf_counter()
    for out in outputs:  # what the engine thread does per step (the forward aside)
        step = recorder.begin_step(out)
        recorder.on_step(out, None if recorder.counts_only else ids, step, step + 1)
    elapsed = time.perf_counter() - t0
    if profiler:
        profiler.disable()
    recorder.close(30)
    return elapsed / STEPS * 1e6, recorder.dropped_steps


def main() -> None:
    mode = sys.argv[sys.argv.index("--mode") + 1] if "--mode" in sys.argv else "tokens"
    profiler = cProfile.Profile() if "--profile" in sys.argv else None
    us, dropped = engine_thread_us(mode, profiler)
    print(f"{mode}: engine thread {us:.0f} us/step over {STEPS} steps of {REQUESTS} requests "
          f"({dropped} dropped: the exporter shares this machine's cores){' (profiled)' if profiler else ''}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()

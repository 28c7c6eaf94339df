"""Host cost of recording one engine step in vLLM's process, without vLLM: synthetic decode
steps of 256 requests x 12 layers x top-4 of 60 experts through the engine-thread part
(begin_step, on_step: the ring copy and the hand-off), with a real exporter process
behind it (by default VLLM_LOG_MOE=discard: it reads every step and keeps the cores
free of any sink's work; --sink PATH writes JSONL). The scheduler's request ids are
fresh each step, as a worker unpickles them; the batch order's are kept, as the runner
keeps them. The rest of each --step-ms
spins, as a forward keeps the engine thread busy (a sleeping thread's core goes cold).
Runs on any host in seconds, no GPU needed.

    python -m tools.profile_sink [--profile] [--mode tokens|counts] [--step-ms 10] [--sink discard|PATH]
"""
import argparse
import cProfile
import pickle
import pstats
import statistics
import time

import torch

from otel_moe.config import from_env
from otel_moe.worker import binding
from otel_moe.worker.capture import RoutingBuffers
from otel_moe.worker.link import ExporterLink
from otel_moe.worker.recorder import StepRecorder

REQUESTS, LAYERS, TOP_K, EXPERTS, STEPS = 256, 12, 4, 60, 300


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
                         "num_experts": EXPERTS, "dp_rank": 0, "internal_id_suffix": binding.INTERNAL_ID_SUFFIX},
                        ring_bytes=64 << 20, backlog_messages=256)
    return StepRecorder(buffers, config, link)


def engine_thread_us(mode: str, step_ms: float, rounds: int, sink: str = "discard",
                     profiler=None) -> tuple[list[float], int]:
    """us a step in the recorder's calls, per round of STEPS steps (a first round warms up)."""
    recorder = synthetic_recorder(mode, [sink])
    ids = [f"{i}-abcdef12" for i in range(REQUESTS)]
    outputs = [SchedulerOutput(s, pickle.loads(pickle.dumps(ids))) for s in range(STEPS)]
    step_ns = int(step_ms * 1e6)
    per_round = []
    for round_index in range(rounds + 1):
        if profiler and round_index == rounds:
            profiler.enable()
        spent = 0
        for out in outputs if round_index else outputs[:STEPS // 10]:
            started = time.perf_counter_ns()
            scheduled = binding.scheduled_step(out)  # what the engine thread does per step, the forward aside
            step = recorder.begin_step(scheduled)
            recorder.on_step(scheduled, None if recorder.counts_only else ids, step, step + 1)
            spent += time.perf_counter_ns() - started
            while time.perf_counter_ns() < started + step_ns:  # the forward's part of the step
                pass
        if profiler:
            profiler.disable()
        if round_index:
            per_round.append(spent / STEPS / 1000)
    recorder.close(30)
    return per_round, recorder.dropped_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("tokens", "counts"), default="tokens")
    parser.add_argument("--step-ms", type=float, default=10.0, help="a step's length; what the calls leave spins")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sink", default="discard",
                        help="VLLM_LOG_MOE for the exporter: discard, or a JSONL path (its work beside the engine thread's)")
    parser.add_argument("--profile", action="store_true", help="the last round under cProfile (it inflates calls)")
    args = parser.parse_args()
    profiler = cProfile.Profile() if args.profile else None
    rounds, dropped = engine_thread_us(args.mode, args.step_ms, args.rounds, args.sink, profiler)
    print(f"{args.mode}: engine thread {statistics.median(rounds):.0f} us/step over {STEPS} steps of {REQUESTS} "
          f"requests (rounds {', '.join(f'{r:.0f}' for r in rounds)}; {dropped} dropped)"
          f"{' (last round profiled)' if profiler else ''}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()

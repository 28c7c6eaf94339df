"""What otel-moe's calls on vLLM's engine thread cost a step, without vLLM: a real
StepRecorder, ring and exporter process (writing JSONL), fed made-up decode steps of
N running requests as vLLM's scheduler hands them (request ids fresh each step, as a
worker unpickles them; the batch order kept, as the runner keeps it). A diagnostic
for the engine thread's own work, not a benchmark: no forward, no GIL contention.

    python tools/recorder_step_cost.py [--mode tokens|counts] [--requests 256] [--layers 12] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pickle
import pstats
import statistics
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from otel_moe.capture import RoutingBuffers  # noqa: E402
from otel_moe.config import from_env  # noqa: E402
from otel_moe.exporter.link import ExporterLink  # noqa: E402
from otel_moe.recorder import StepRecorder  # noqa: E402

TOP_K, EXPERTS = 4, 60  # Qwen1.5-MoE-A2.7B's routing, as the GPU bench's model


def decode_steps(requests: int, steps: int) -> tuple[list, list[str]]:
    """Scheduler outputs of a run of decode steps (every request one token), and the batch order."""
    ids = [f"cmpl-{uuid.uuid4().hex}-0-{uuid.uuid4().hex[:8]}" for _ in range(requests)]
    outputs = []
    for step in range(steps):
        fresh = pickle.loads(pickle.dumps(ids))
        outputs.append(types.SimpleNamespace(
            scheduled_new_reqs=[],
            scheduled_cached_reqs=types.SimpleNamespace(req_ids=fresh, num_computed_tokens=[128 + step] * requests),
            num_scheduled_tokens=dict.fromkeys(fresh, 1), total_num_scheduled_tokens=requests,
            finished_req_ids=set()))
    return outputs, list(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("tokens", "counts"), default="tokens")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--step-ms", type=float, default=10.0, help="a step's length, the forward's part waited out")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="one more round under cProfile (inflates calls)")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="otel-moe-step-cost-")) / "records.jsonl"
    config = from_env({"VLLM_LOG_MOE": str(out), "VLLM_LOG_MOE_MODE": args.mode})
    buffers = RoutingBuffers(list(range(args.layers)), 8192, TOP_K, EXPERTS, "cpu", tokens=args.mode == "tokens")
    if args.mode == "counts":
        buffers.enable_counts()
    link = ExporterLink({"destinations": [str(out)], "mode": args.mode, "resource": {}, "top_k": TOP_K,
                         "num_experts": EXPERTS, "dp_rank": 0, "randomized_request_ids": False},
                        ring_bytes=config.ring_mb << 20, backlog_messages=config.queue_steps)
    recorder = StepRecorder(buffers, config, link)
    outputs, order = decode_steps(args.requests, 64)
    step_ns = int(args.step_ms * 1e6)

    def run(steps: int) -> float:
        """Mean us a step in the recorder's calls; each step then spins out the rest of its
        --step-ms, as the forward would keep the thread busy, so the exporter keeps up."""
        spent = 0
        for step in range(steps):
            out = outputs[step % len(outputs)]
            started = time.perf_counter_ns()
            recorder.begin_step(out)
            recorder.on_step(out, None if recorder.counts_only else list(order), step * step_ns, step * step_ns + 1)
            took = time.perf_counter_ns() - started
            spent += took
            until = started + step_ns
            while time.perf_counter_ns() < until:  # busy, as an engine thread is (a sleep lets its core go cold)
                pass
        return spent / steps / 1000

    with torch.inference_mode():
        run(50)
        rounds = [run(args.steps) for _ in range(args.rounds)]
        print(f"{args.mode}: {statistics.median(rounds):.1f} us a step ({args.requests} requests, {args.layers} layers); "
              f"rounds {', '.join(f'{r:.1f}' for r in rounds)}; dropped {recorder.dropped_steps}")
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(run, args.steps)
            pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    recorder.close(30)


if __name__ == "__main__":
    main()

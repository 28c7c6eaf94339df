"""What building and encoding a tokens step's message costs vLLM's engine thread: the
whole layout against otel_moe.step_layout's (what the previous step said left out). A
diagnostic, not a benchmark: no engine, only the message, on whatever CPU runs it.

    python tools/layout_encoding.py [--requests 256] [--steps 3000]

The scheduler's request ids are made fresh each step, as the worker gets them (unpickled
from the engine core); the batch order's are kept, as the runner keeps them.
"""
from __future__ import annotations

import argparse
import marshal
import os
import pickle
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from otel_moe.step_layout import LayoutEncoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ids = [f"cmpl-{uuid.uuid4().hex}-0-{uuid.uuid4().hex[:8]}" for _ in range(args.requests)]
    batch_order = list(ids)
    fresh = [pickle.loads(pickle.dumps(ids)) for _ in range(64)]  # a step's scheduler output each
    head = (2, 0, [("|u1", [args.requests, 12, 4]), ("<f2", [args.requests, 12, 4])], 5, 17, 1, 2,
            list(range(12)), False, 0, 0, 0, 99)

    def whole(step: int) -> bytes:
        cached = fresh[step % 64]
        return marshal.dumps(head + (args.requests, list(batch_order), dict.fromkeys(cached, 1), cached,
                                     [300 + step] * args.requests, []))

    encoder = LayoutEncoder()

    def compact(step: int) -> bytes:
        cached = fresh[step % 64]
        return marshal.dumps(head + encoder.encode(args.requests, list(batch_order), dict.fromkeys(cached, 1),
                                                   cached, [300 + step] * args.requests, []))

    times: dict[str, list[float]] = {"whole": [], "compact": []}
    for _ in range(args.rounds):
        for name, build in (("whole", whole), ("compact", compact)):
            build(0)
            started = time.perf_counter_ns()
            for step in range(args.steps):
                build(step)
            times[name].append((time.perf_counter_ns() - started) / args.steps / 1000)
    for name, build in (("whole", whole), ("compact", compact)):
        print(f"{name}: {statistics.median(times[name]):.1f} us a step (dict and lists built too), "
              f"{len(build(1))} bytes; rounds {', '.join(f'{t:.1f}' for t in times[name])}")


if __name__ == "__main__":
    main()

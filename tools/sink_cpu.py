"""CPU the OTLP path costs per tokens-mode step, outside vLLM: the exporter's OTLP sink
(spans, request tallies, metrics, export over gRPC) and the embedded collector (receive,
admit, OTLP/JSON, write), for synthetic 256-request decode steps of 12 layers x top-4 of 60
experts (tools/profile_sink.py's shape), plus the bytes the collector writes per step.
This is the CPU a GPU host gives otel-moe beside vLLM (about 0.7 of a core at ~100 steps/s).
Runs on any host in seconds, no GPU needed.

    python -m tools.sink_cpu [--steps 300] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tools.bench_vllm import process_cpu_s  # noqa: E402
from tools.profile_sink import EXPERTS, LAYERS, REQUESTS, TOP_K  # noqa: E402


def decode_steps(count: int, first: int = 0):
    """StepRecords of one token for each of REQUESTS requests, weights in float16 as captured."""
    from otel_moe.exporter.records import StepRecord

    rng = np.random.default_rng(0)
    ids = rng.integers(0, EXPERTS, (REQUESTS, LAYERS, TOP_K)).astype(np.uint8)
    weights = rng.random((REQUESTS, LAYERS, TOP_K)).astype(np.float16)
    request_ids = [f"cmpl-{i:08d}-0123456789abcdef0123456789abcdef" for i in range(REQUESTS)]
    for step in range(first, first + count):
        now = time.time_ns()
        yield StepRecord(step=step, start_ns=now, end_ns=now + 10_000_000, layers=list(range(LAYERS)), top_k=TOP_K,
                         num_experts=EXPERTS, request_ids=request_ids, request_tokens=np.ones(REQUESTS, np.int64),
                         positions=np.full(REQUESTS, 128 + step, np.int64),
                         prompt_lens=np.full(REQUESTS, 128, np.int64), ids=ids, weights=weights)


def measure(steps: int, rounds: int) -> list[dict]:
    """One collector and one sink for every round (the first round warms up)."""
    from otel_moe.collector.process import CollectorProcess
    from otel_moe.config import from_env
    from otel_moe.exporter.sinks import open_sinks

    out = Path(tempfile.mkdtemp(prefix="sink-cpu-"))
    collector = CollectorProcess(out)
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc")
    sink = open_sinks(from_env({"VLLM_LOG_MOE": "otlp"}), {"otel_moe.run_id": "sink-cpu"})
    results = []
    try:
        for round_index in range(rounds + 1):
            written = sum(f.stat().st_size for f in out.glob("*.json"))
            exporter_0, collector_0 = time.process_time(), process_cpu_s(collector.proc.pid)
            for record in decode_steps(steps, round_index * steps):
                sink.write(record)
            sink.idle()  # the last spans exported: the collector has answered every request
            exporter_s = time.process_time() - exporter_0
            collector_s = process_cpu_s(collector.proc.pid) - collector_0
            if round_index:
                results.append({"exporter_ms": 1e3 * exporter_s / steps, "collector_ms": 1e3 * collector_s / steps,
                                "written_kb": (sum(f.stat().st_size for f in out.glob("*.json")) - written) / steps / 1e3})
    finally:
        sink.close(30)
        collector.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = measure(args.steps, args.rounds)
    for key, what in (("exporter_ms", "exporter CPU ms/step"), ("collector_ms", "collector CPU ms/step"),
                      ("written_kb", "collector files KB/step")):
        values = [r[key] for r in results]
        print(f"{what:<26}{statistics.median(values):8.2f}  (rounds {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()

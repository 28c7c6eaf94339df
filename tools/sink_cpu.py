"""CPU the OTLP path costs per tokens-mode step, outside vLLM: the exporter's OTLP sink
(spans, request tallies, metrics, export over gRPC) and the embedded collector (receive,
admit, OTLP/JSON, write), for synthetic 256-request decode steps of real models' routing
shapes (by default 12 layers x top-4 of 60 experts, tools/profile_sink.py's), plus the bytes
the collector writes: per step and per routed expert id. This is the CPU a GPU host gives
otel-moe beside vLLM. Runs on any host in seconds to minutes, no GPU needed.

    python -m tools.sink_cpu [--steps 300] [--rounds 3] [--shapes 12x60x4,58x256x8] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tools.bench_vllm import process_cpu_s  # noqa: E402
from tools.profile_sink import EXPERTS, LAYERS, REQUESTS, TOP_K  # noqa: E402

# layers x experts x top-k: Qwen1.5-MoE's 24 x 60 x 4, Mixtral's 32 x 8 x 2, DeepSeek-V3's
# 58 x 256 x 8, Qwen3-235B's 94 x 128 x 8; the default is profile_sink's 12 x 60 x 4
SHAPES = ("12x60x4", "24x60x4", "32x8x2", "58x256x8", "94x128x8")


def decode_steps(count: int, first: int = 0, layers: int = LAYERS, experts: int = EXPERTS, top_k: int = TOP_K):
    """StepRecords of one token for each of REQUESTS requests, ids as narrow as the ring
    holds them, weights in float16 as captured."""
    from otel_moe.exporter.records import StepRecord

    rng = np.random.default_rng(0)
    ids = rng.integers(0, experts, (REQUESTS, layers, top_k)).astype(np.uint8 if experts <= 256 else np.int16)
    weights = rng.random((REQUESTS, layers, top_k)).astype(np.float16)
    request_ids = [f"cmpl-{i:08d}-0123456789abcdef0123456789abcdef" for i in range(REQUESTS)]
    for step in range(first, first + count):
        now = time.time_ns()
        yield StepRecord(step=step, start_ns=now, end_ns=now + 10_000_000, layers=list(range(layers)), top_k=top_k,
                         num_experts=experts, request_ids=request_ids, request_tokens=np.ones(REQUESTS, np.int64),
                         positions=np.full(REQUESTS, 128 + step, np.int64),
                         prompt_lens=np.full(REQUESTS, 128, np.int64), ids=ids, weights=weights)


def measure(steps: int, rounds: int, layers: int = LAYERS, experts: int = EXPERTS, top_k: int = TOP_K) -> list[dict]:
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
            for record in decode_steps(steps, round_index * steps, layers, experts, top_k):
                sink.write(record)
            sink.idle()  # the last spans exported: the collector has answered every request
            exporter_s = time.process_time() - exporter_0
            collector_s = process_cpu_s(collector.proc.pid) - collector_0
            if round_index:
                ids = steps * REQUESTS * layers * top_k
                written_bytes = sum(f.stat().st_size for f in out.glob("*.json")) - written
                results.append({"exporter_ms": 1e3 * exporter_s / steps, "collector_ms": 1e3 * collector_s / steps,
                                "written_kb": written_bytes / steps / 1e3, "exporter_ns_per_id": 1e9 * exporter_s / ids,
                                "collector_ns_per_id": 1e9 * collector_s / ids, "bytes_per_id": written_bytes / ids})
    finally:
        sink.close(30)
        collector.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default=SHAPES[0], help=f"layers x experts x top-k, comma-separated (e.g. {','.join(SHAPES)})")
    parser.add_argument("--out", help="also write the figures here (JSON), e.g. bench/DATE-cpu-NCORE-sink.json")
    args = parser.parse_args()
    every = {}
    for shape in args.shapes.split(","):
        layers, experts, top_k = map(int, shape.split("x"))
        results = measure(args.steps, args.rounds, layers, experts, top_k)
        every[shape] = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print(f"{shape} ({REQUESTS} tokens a step):")
        for key, what in (("exporter_ms", "exporter CPU ms/step"), ("collector_ms", "collector CPU ms/step"),
                          ("written_kb", "collector files KB/step"), ("exporter_ns_per_id", "exporter CPU ns/id"),
                          ("collector_ns_per_id", "collector CPU ns/id"), ("bytes_per_id", "bytes written/id")):
            values = [r[key] for r in results]
            print(f"  {what:<26}{statistics.median(values):8.2f}  (rounds {', '.join(f'{v:.2f}' for v in values)})")
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                              "cpus": os.cpu_count(), "steps": args.steps, "tokens_per_step": REQUESTS,
                                              "shapes": every}, indent=1))


if __name__ == "__main__":
    main()

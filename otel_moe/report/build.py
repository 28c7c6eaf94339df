"""Turn the input stream into per-run statistics and ``summary.json``."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from otel_moe.read import LineStats, SchemaError
from otel_moe.report.aggregate import RunStats, entropy_bits
from otel_moe.report.inputs import Latency, StepBatch, input_files, stream
from otel_moe.report.profile import ProfileJoin


class EmptyInput(ValueError):
    """No routing record in the input."""


def aggregate(paths: list[str], stats: LineStats, progress: bool = False,
              profile: Optional[ProfileJoin] = None) -> dict[str, RunStats]:
    """Per-run statistics of the routing input; ``profile`` also collects the
    routing of the steps a profiler trace covers."""
    runs: dict[str, RunStats] = {}
    latencies: list[Latency] = []
    total = sum(os.path.getsize(f) for f in input_files(paths))
    bar = _progress_bar(total) if progress else None
    for item in stream(paths, stats, on_bytes=bar.update if bar else (lambda n: None)):
        if isinstance(item, Latency):
            latencies.append(item)
            continue
        run = runs.setdefault(item.run, RunStats())
        _add_step(run, item)
        if profile is not None and item.layers:
            profile.add(item.run, item.dp_rank, item.step, {lb.layer: lb.counts for lb in item.layers},
                        item.layers[0].num_tokens)
    if bar:
        bar.close()
    for run in runs.values():
        run.flush_step()
    if not runs:
        raise EmptyInput("no otel-moe routing records in the input")
    _attach_latencies(runs, latencies)
    return runs


def _add_step(run: RunStats, step: StepBatch) -> None:
    run.add_request_tokens(step.request_ids, step.request_tokens, step.prefill_tokens)
    for lb in step.layers:
        run.add_layer(step.step, lb.layer, lb.num_experts, lb.counts, lb.ids, lb.weights,
                      step.request_ids if lb.request_of is not None else None, lb.request_of, lb.prefill, lb.num_tokens)


def _attach_latencies(runs: dict[str, RunStats], latencies: list[Latency]) -> None:
    only = next(iter(runs.values())) if len(runs) == 1 else None
    for lat in latencies:
        run = runs.get(lat.run) if lat.run else only
        if run is None or lat.request_id not in run.requests:
            continue  # a request of a run without routing in the input
        r = run.requests[lat.request_id]
        r.e2e_s, r.ttft_s, r.queue_s, r.completion_tokens = lat.e2e_s, lat.ttft_s, lat.queue_s, lat.completion_tokens


def _progress_bar(total: int):
    if total < 64 << 20:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="otel-moe report")


def request_key(run: str, request_id: str, several_runs: bool) -> str:
    return f"{run}/{request_id}" if several_runs else request_id


def tpot_s(r) -> Optional[float]:
    if r.e2e_s is None or r.ttft_s is None or not r.completion_tokens or r.completion_tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (r.completion_tokens - 1)


def summary(runs: dict[str, RunStats], stats: LineStats, files: list[str]) -> dict:
    several = len(runs) > 1
    layers: dict[str, dict] = {}
    requests: dict[str, dict] = {}
    for run_name, run in runs.items():
        for layer, ls in run.layers.items():
            entry = layers.setdefault(str(layer), {"tokens": 0, "counts": np.zeros(0, np.int64),
                                                     "prefill_counts": np.zeros(0, np.int64), "decode_counts": np.zeros(0, np.int64),
                                                     "_top1": 0.0, "_wsum": 0.0, "_wtok": 0, "_mom": []})
            entry["tokens"] += ls.tokens
            for key, arr in (("counts", ls.counts), ("prefill_counts", ls.prefill), ("decode_counts", ls.decode)):
                have = entry[key]
                size = max(len(have), len(arr))
                entry[key] = np.pad(have, (0, size - len(have))) + np.pad(arr, (0, size - len(arr)))
            entry["_top1"] += ls.top1_weight_sum
            entry["_wsum"] += ls.weight_sum
            entry["_wtok"] += ls.weighted_tokens
            entry["_mom"].extend(ls.max_over_mean.y)
        for request_id, r in run.requests.items():
            spread = entropy_bits(r.experts) if r.experts is not None else None
            requests[request_key(run_name, request_id, several)] = {
                "tokens": r.tokens, "prefill_tokens": r.prefill, "decode_tokens": r.decode,
                "e2e_s": r.e2e_s, "ttft_s": r.ttft_s, "queue_s": r.queue_s, "tpot_s": tpot_s(r),
                "expert_entropy_bits": spread,
            }
    for entry in layers.values():
        counts = entry["counts"]
        mean = counts.mean() if len(counts) else 0
        entry["imbalance_max_over_mean"] = float(counts.max() / mean) if mean else None
        entry["imbalance_cv"] = float(counts.std() / mean) if mean else None
        entry["entropy_bits"] = entropy_bits(counts)
        entry["max_entropy_bits"] = float(np.log2(len(counts))) if len(counts) else 0.0
        entry["step_max_over_mean_mean"] = float(np.mean(entry["_mom"])) if entry["_mom"] else None
        entry["mean_top1_weight"] = entry["_top1"] / entry["_wtok"] if entry["_wtok"] else None
        entry["mean_topk_weight_sum"] = entry["_wsum"] / entry["_wtok"] if entry["_wtok"] else None
        for key in ("counts", "prefill_counts", "decode_counts"):
            entry[key] = entry[key].tolist()
        for key in [k for k in entry if k.startswith("_")]:
            del entry[key]
    return {
        "schema": "otel-moe-report/1",
        "inputs": {"files": files, "lines": stats.lines, "bad_lines": stats.bad_lines},
        "runs": {name: {"steps": run.steps, "requests": len(run.requests), "layers": sorted(run.layers)} for name, run in runs.items()},
        "request_key": "run/request_id" if several else "request_id",
        "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0]))),
        "requests": requests,
    }


__all__ = ["aggregate", "summary", "EmptyInput", "SchemaError"]

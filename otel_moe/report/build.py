"""Turn the input stream into per-run statistics and each run's ``summary.json``."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from otel_moe.report import analyses
from otel_moe.report.aggregate import RunStats
from otel_moe.report.inputs import Latency, MetricsWindow, RequestTally, StepRouting, input_files, unexpected
from otel_moe.report.profile import ProfileJoin
from otel_moe.report.read import LineStats, SchemaError
from otel_moe.report.reader_process import read_items

SUMMARY_SCHEMA = "otel-moe-report/2"


class EmptyInput(ValueError):
    """No routing record in the input."""


def aggregate(paths: list[str], stats: LineStats, on_bytes: Optional[Callable[[int], None]] = None,
              profile: Optional[ProfileJoin] = None, only_run: Optional[str] = None) -> dict[str, RunStats]:
    """Per-run statistics of the routing input (``only_run``: that run alone);
    ``profile`` also collects the routing of the steps a profiler trace covers."""
    runs: dict[str, RunStats] = {}
    latencies: list[Latency] = []
    windows: list[StepRouting] = []
    tallies: list[RequestTally] = []
    found: set[str] = set()
    for item in read_items(paths, stats, on_bytes=on_bytes or (lambda n: None)):
        if isinstance(item, Latency):
            latencies.append(item)
            continue
        if isinstance(item, RequestTally):
            tallies.append(item)
            continue
        if isinstance(item, MetricsWindow):
            windows.append(item.batch)
            continue
        found.add(item.run)
        if only_run is not None and item.run != only_run:
            continue
        run = runs.setdefault(item.run, RunStats())
        try:
            _add_step(run, item)
        except Exception as err:  # a step no check foresaw: it alone is lost, counted
            stats.skip(unexpected(err))
            continue
        if profile is not None and item.layers:
            profile.add(item.run, item.dp_rank, item.step, {lb.layer: lb.counts for lb in item.layers},
                        item.layers[0].num_tokens)
    # Metrics count the same tokens as the spans: they fill in only runs that have no spans.
    for batch in windows:
        if batch.run not in found and (only_run is None or batch.run == only_run):
            _add_step(runs.setdefault(batch.run, RunStats()), batch)
    found |= {batch.run for batch in windows}
    for tally in tallies:  # counts mode: each request's tokens (its steps' spans name none)
        run = runs.get(tally.run)
        if run is not None:
            run.add_request_tokens([tally.request_id], np.array([tally.prefill_tokens + tally.decode_tokens]),
                                   np.array([tally.prefill_tokens]))
    for run in runs.values():
        run.finish()
    if not runs:
        raise EmptyInput(_nothing_found(input_files(paths), stats, found, only_run))
    _attach_latencies(runs, latencies, stats)
    return runs


def _nothing_found(files: list[str], stats: LineStats, found: set[str], only_run: Optional[str]) -> str:
    if only_run is not None and found:
        return f"no run {only_run!r} in the input; runs found: {', '.join(sorted(found))}"
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    read = f"read {len(files)} file(s) ({shown}), {stats.lines} lines" if files else "no .json or .jsonl files in the input"
    why = []
    if stats.bad_lines:
        why.append(f"{stats.bad_lines} not JSON objects of OTLP/JSON or otel-moe JSONL")
    why += [f"{n} skipped: {reason}" for reason, n in stats.skipped.most_common(3)]
    return (f"no otel-moe routing records in the input: {read}" + (f"; {'; '.join(why)}" if why else "")
            + ". Point it at the collector's --out folder (or a VLLM_LOG_MOE=file.jsonl log)")


def _add_step(run: RunStats, step: StepRouting) -> None:
    run.unsampled_tokens += step.unsampled_tokens
    if step.layers and not step.layers[0].num_tokens and step.unsampled_tokens:
        return  # every request of the step went unsampled: no routing here, and none missing
    if step.layers:  # counts mode: request tallies come in records of their own, without layers
        run.begin_step(step.step, step.layers[0].num_tokens)
    run.add_request_tokens(step.request_ids, step.request_tokens, step.prefill_tokens)
    rows = run.request_rows(step.request_ids) if any(lb.request_of is not None for lb in step.layers) else None
    if _same_tokens(step.layers) and run.add_token_layers(
            [lb.layer for lb in step.layers], step.layers[0].num_experts, [lb.counts for lb in step.layers],
            np.stack([lb.ids for lb in step.layers]), np.stack([lb.weights for lb in step.layers]), rows,
            step.layers[0].request_of, step.layers[0].prefill, step.layers[0].positions, step.layers[0].num_tokens):
        return
    for lb in step.layers:
        run.add_layer(lb.layer, lb.num_experts, lb.counts, lb.ids, lb.weights, rows if lb.request_of is not None else None,
                      lb.request_of, lb.prefill, lb.positions, lb.num_tokens)


def _same_tokens(layers: list) -> bool:
    """Every layer of the step routed the same tokens, as a collector's step span lays them
    out (one request_of, positions and phase for all): RunStats can add them at once."""
    if len(layers) < 2:
        return False
    first = layers[0]
    if first.ids is None or first.weights is None or first.request_of is None or first.positions is None:
        return False
    return all(lb.ids is not None and lb.weights is not None and lb.ids.shape == first.ids.shape
               and lb.ids.dtype == first.ids.dtype and lb.weights.shape == first.ids.shape
               and lb.num_experts == first.num_experts and lb.request_of is first.request_of
               and lb.positions is first.positions and lb.prefill is first.prefill for lb in layers)


def _attach_latencies(runs: dict[str, RunStats], latencies: list[Latency], stats: LineStats) -> None:
    only = next(iter(runs.values())) if len(runs) == 1 else None
    for lat in latencies:
        run = runs.get(lat.run) if lat.run else only
        if run is None or lat.request_id not in run.requests:
            continue  # a request of a run without routing in the input
        r = run.requests[lat.request_id]
        r.e2e_s, r.ttft_s, r.queue_s, r.completion_tokens = lat.e2e_s, lat.ttft_s, lat.queue_s, lat.completion_tokens
        r.trace_id = lat.trace_id


def inputs_section(stats: LineStats, files: list[str]) -> dict:
    return {"files": files, "lines": stats.lines, "bad_lines": stats.bad_lines,
            "skipped_records": dict(stats.skipped.most_common())}


def input_warnings(inputs: dict) -> list[str]:
    """What reading passed over (an ``inputs`` section), one line each, for stderr."""
    lines = [f"skipped {inputs['bad_lines']} unreadable lines of {inputs['lines']} (not JSON objects of OTLP/JSON "
             "or otel-moe JSONL, or truncated)"] if inputs["bad_lines"] else []
    return lines + [f"skipped {n} records: {reason}" for reason, n in inputs["skipped_records"].items()]


def run_summary(name: str, run: RunStats, stats: LineStats, files: list[str], runs_found: list[str]) -> dict:
    """summary.json of one run."""
    requests = analyses.requests_section(run)
    layers = sorted(run.routing.slots)
    return {
        "schema": SUMMARY_SCHEMA,
        "run": name,
        "runs_found": runs_found,
        "inputs": inputs_section(stats, files),
        "steps": run.steps,
        "unsampled_tokens": run.unsampled_tokens,  # of requests not sampled: counted by the metrics alone
        "modes": sorted(run.modes),
        "top_k": run.top_k,
        "layers": {str(layer): analyses.layer_entry(ls) for layer, ls in sorted(run.layers.items())},
        "requests": requests,
        "requests_without_routing_detail": run.routing.not_kept,
        "request_layers": layers,
        "latency": analyses.latency_percentiles(requests),
        "slowest_requests": analyses.slowest_requests(requests, layers),
        "cooccurrence": analyses.cooccurrence_section(run),
        "position_expert": analyses.position_section(run),
    }


__all__ = ["aggregate", "run_summary", "input_warnings", "EmptyInput", "SchemaError", "SUMMARY_SCHEMA"]

"""A short per-layer text summary of routing, from the report's own aggregation
(``otel-moe summary`` and ``make demo``)."""
from __future__ import annotations

import sys


def summarize(inputs: list[str], only_run: str | None = None) -> list[dict]:
    """Each run's summary.json content for these inputs (collector files or JSONL logs), without images."""
    from otel_moe.report.build import aggregate, run_summary
    from otel_moe.report.inputs import input_files
    from otel_moe.report.read import LineStats

    stats = LineStats()
    runs = aggregate(inputs, stats, only_run=only_run)
    files = input_files(inputs)
    return [run_summary(name, runs[name], stats, files, sorted(runs)) for name in sorted(runs)]


def print_summary(summary: dict) -> None:
    """One run's table; a report over several runs prints each."""
    if "run" not in summary:
        for one in summary["runs"].values():
            print_summary(one)
        return
    if len(summary["runs_found"]) > 1:
        print(f"run {summary['run']}:")
    requests = summary["requests"].values()
    with_latency = [r for r in requests if r["e2e_s"] is not None]
    print(f"{len(summary['requests'])} requests, {len(with_latency)} with vLLM latency spans")
    from otel_moe.report.analyses import sampling_line

    if sampling_line(summary):
        print(sampling_line(summary))
    print(f"{'layer':>5} {'tokens':>7}  {'top experts (share)':<34} {'max/mean':>8} {'entropy':>8}")
    for layer, stats in summary["layers"].items():
        counts = stats["counts"]
        total = sum(counts)
        top = sorted(range(len(counts)), key=lambda e: -counts[e])[:3]
        tops = ", ".join(f"e{e} {counts[e] / total:.0%}" for e in top if counts[e]) if total else "-"
        imbalance = stats["imbalance_max_over_mean"]
        print(f"{layer:>5} {stats['tokens']:>7}  {tops:<34} {imbalance if imbalance is not None else float('nan'):>8.2f} "
              f"{stats['entropy_bits']:>5.2f}/{stats['max_entropy_bits']:.0f}")
    print("tokens: routed through the layer. top experts: the busiest three, by share of the layer's assignments.\n"
          "max/mean: the busiest expert's load over the mean (1.00: even). entropy: of the expert shares, in bits, "
          "over its most, log2(experts) (reached when even).")
    line = latency_line(summary["latency"])
    if line:
        print(f"latency: {line}")
    profile = summary.get("profile")
    if profile:
        print(f"profiler trace: {profile['steps_joined']} of {profile['steps_in_trace']} steps joined to their routing "
              f"({', '.join(profile['time_source'])})")
        print(f"{'layer':>5} {'MoE us/step':>12} {'max/mean':>8}")
        for layer, stats in profile["layers"].items():
            imbalance = stats["imbalance_max_over_mean_mean"]
            print(f"{layer:>5} {stats['moe_us_mean']:>12.1f} {imbalance if imbalance is not None else float('nan'):>8.2f}")


def latency_line(latency: dict) -> str:
    """'TTFT p50/p90/p99 1.0/2.0/3.0 ms, ...' (empty without vLLM's latency spans)."""
    return ", ".join(f"{name[:-3].upper()} p50/p90/p99 {v['p50']:.1f}/{v['p90']:.1f}/{v['p99']:.1f} ms"
                     for name, v in latency.items() if v["count"])


def run(inputs: list[str], only_run: str | None = None) -> int:
    from otel_moe.report.build import EmptyInput, input_warnings
    from otel_moe.report.read import SchemaError

    try:
        summaries = summarize(inputs, only_run)
    except (EmptyInput, SchemaError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
        print(f"otel-moe summary: error: {err}", file=sys.stderr)
        return 2
    for line in input_warnings(summaries[0]["inputs"]):
        print(f"otel-moe summary: {line}", file=sys.stderr)
    for summary in summaries:
        print_summary(summary)
    return 0

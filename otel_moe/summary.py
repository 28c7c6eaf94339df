"""A short per-layer text summary of routing, from the report's own aggregation
(``otel-moe summary`` and ``make demo``)."""
from __future__ import annotations

import sys


def summarize(inputs: list[str]) -> dict:
    """summary.json's content for these inputs (collector files or JSONL logs), without images."""
    from otel_moe.read import LineStats
    from otel_moe.report.build import aggregate, summary
    from otel_moe.report.inputs import input_files

    stats = LineStats()
    return summary(aggregate(inputs, stats), stats, input_files(inputs))


def print_summary(summary: dict) -> None:
    requests = summary["requests"].values()
    with_latency = [r for r in requests if r["e2e_s"] is not None]
    print(f"{len(summary['requests'])} requests, {len(with_latency)} with vLLM latency spans")
    print(f"{'layer':>5} {'tokens':>7}  {'top experts (share)':<34} {'max/mean':>8} {'entropy':>8}")
    for layer, stats in summary["layers"].items():
        counts = stats["counts"]
        total = sum(counts)
        top = sorted(range(len(counts)), key=lambda e: -counts[e])[:3]
        tops = ", ".join(f"e{e} {counts[e] / total:.0%}" for e in top)
        print(f"{layer:>5} {stats['tokens']:>7}  {tops:<34} {stats['imbalance_max_over_mean']:>8.2f} "
              f"{stats['entropy_bits']:>5.2f}/{stats['max_entropy_bits']:.0f}")
    profile = summary.get("profile")
    if profile:
        print(f"profiler trace: {profile['steps_joined']} of {profile['steps_in_trace']} steps joined to their routing "
              f"({', '.join(profile['time_source'])})")
        print(f"{'layer':>5} {'MoE us/step':>12} {'max/mean':>8}")
        for layer, stats in profile["layers"].items():
            imbalance = stats["imbalance_max_over_mean_mean"]
            print(f"{layer:>5} {stats['moe_us_mean']:>12.1f} {imbalance if imbalance is not None else float('nan'):>8.2f}")


def run(inputs: list[str]) -> int:
    from otel_moe.read import SchemaError
    from otel_moe.report.build import EmptyInput

    try:
        print_summary(summarize(inputs))
    except (EmptyInput, SchemaError, FileNotFoundError) as err:
        print(f"otel-moe summary: error: {err}", file=sys.stderr)
        return 2
    return 0

"""``otel-moe``: the command line (tiny-model, collector, report, summary, control)."""
from __future__ import annotations

import argparse
import sys


def _tiny_model(args: argparse.Namespace) -> int:
    from otel_moe import tiny_model

    tiny_model.build(args.dir, args.arch, args.layers, args.seed)
    print(f"{args.arch} checkpoint with {args.layers} layers written to {args.dir}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from otel_moe.summary import run

    return run(args.inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-moe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from otel_moe.tiny_model import ARCHITECTURES

    tiny = commands.add_parser("tiny-model", help="build a small random-weight MoE checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=sorted(ARCHITECTURES), default="qwen2_moe")
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_model)

    summary = commands.add_parser("summary", help="per-layer expert usage of collector files or JSONL logs")
    summary.add_argument("inputs", nargs="+")
    summary.set_defaults(run=_summary)

    from otel_moe.collector import server

    collector = commands.add_parser("collector", help="run the embedded OTLP collector (writes OTLP/JSON files)")
    server.add_arguments(collector)
    collector.set_defaults(run=server.run)

    from otel_moe.report import main as report

    report_parser = commands.add_parser("report", help="histograms, heatmap, imbalance and latency from routing data")
    report.add_arguments(report_parser)
    report_parser.set_defaults(run=report.run)

    from otel_moe.control import cli as control

    control_parser = commands.add_parser("control", help="start, stop or switch recording on a running vLLM (live control file)")
    control.add_arguments(control_parser)
    control_parser.set_defaults(run=control.run)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""``otel-moe``: the command line (tiny-model, collector, report, summary, control)."""
from __future__ import annotations

import argparse
import os
import sys

DEBUG = "OTEL_MOE_DEBUG"  # set: an unexpected failure shows its traceback


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line naming what is wrong (exit 2), not argparse's usage block;
    an argument a subcommand does not take is refused by that subcommand (its own --help)."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self.commands.get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("otel-moe")
    except PackageNotFoundError:
        return "unknown"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _tiny_model(args: argparse.Namespace) -> int:
    from otel_moe import tiny_model

    if args.shape:
        tiny_model.build_shape(args.dir, args.shape, args.seed)
        shape = tiny_model.SHAPES[args.shape]
        print(f"{args.shape} ({shape.arch}, {shape.layers} layers, {len(shape.moe_layers)} of them MoE, "
              f"{shape.routing.experts} experts, top-{shape.routing.top_k}) checkpoint written to {args.dir}")
        return 0
    tiny_model.build(args.dir, args.arch, args.layers, args.seed)
    print(f"{args.arch} checkpoint with {args.layers} layers written to {args.dir}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from otel_moe.report.summary import run

    return run(args.inputs, args.run)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="otel-moe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"otel-moe {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    from otel_moe.tiny_model import ARCHITECTURES

    tiny = commands.add_parser("tiny-model", help="build a small random-weight MoE checkpoint")
    tiny.add_argument("dir", help="folder to write the checkpoint into")
    tiny.add_argument("--arch", choices=sorted(ARCHITECTURES), default="qwen2_moe", help="model family (default: %(default)s)")
    tiny.add_argument("--layers", type=_positive, default=4, help="decoder layers, each with an MoE block (default: %(default)s)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: %(default)s)")
    from otel_moe.tiny_model import SHAPES

    tiny.add_argument("--shape", choices=sorted(SHAPES), help="a real model's routing shape (layers, experts, top-k, "
                      "dense layers) instead of --arch/--layers; deepseek-v3 is 58 x 256, top-8, after 3 dense layers")
    tiny.set_defaults(handler=_tiny_model)

    summary = commands.add_parser("summary", help="per-layer expert usage of collector files or JSONL logs")
    summary.add_argument("inputs", nargs="+", help="collector files or folders, JSONL routing logs")
    summary.add_argument("--run", metavar="ID", help="only this run (otel_moe.run_id)")
    summary.set_defaults(handler=_summary)

    from otel_moe.collector import server

    collector = commands.add_parser("collector", help="run the embedded OTLP collector (writes OTLP/JSON files)")
    server.add_arguments(collector)
    collector.set_defaults(handler=server.run)

    from otel_moe.report import main as report

    report_parser = commands.add_parser("report", help="histograms, heatmap, imbalance and latency from routing data")
    report.add_arguments(report_parser)
    report_parser.set_defaults(handler=report.run)

    from otel_moe.report import compare

    compare_parser = commands.add_parser("compare", help="two runs' routing side by side: share differences and "
                                         "Jensen-Shannon divergence per layer")
    compare.add_arguments(compare_parser)
    compare_parser.set_defaults(handler=compare.run)

    from otel_moe.control import command as control

    control_parser = commands.add_parser("control", help="start, stop or switch recording on a running vLLM (live control file)")
    control.add_arguments(control_parser)
    control_parser.set_defaults(handler=control.run)

    parser.commands = dict(commands.choices)
    return parser


def _inputs(args: argparse.Namespace) -> str:
    """What a command was reading or writing, for its last-resort error line."""
    names = [getattr(args, "inputs", None), [getattr(args, k, None) for k in ("a", "b", "file", "dir", "out")]]
    return " ".join(str(v) for group in names for v in (group or []) if v)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # `otel-moe summary ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # no traceback for a user: one line naming the command, input and version
        if os.environ.get(DEBUG):
            raise
        print(f"otel-moe {args.command}: error: {type(err).__name__}: {err} (on {_inputs(args) or 'no input'}; "
              f"otel-moe {_version()}; {DEBUG}=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

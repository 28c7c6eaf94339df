"""``otel-moe report INPUT... --out DIR``: one folder of figures, summary.json,
requests.csv and report.html per run; input holding several runs gets a
folder per run and an index page (or ``--run ID`` picks one)."""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from typing import Callable, Optional

from otel_moe.layer_ranges import RangeError, format_ranges, parse_ranges
from otel_moe.report import profile
from otel_moe.report.progress import Progress
from otel_moe.report.read import LineStats
from otel_moe.report.summary import latency_line

MAX_PER_LAYER_FILES_AUTO = 8
COOCCURRENCE_LAYERS = 6
POSITION_LAYERS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="collector files or folders, JSONL routing logs, "
                        "torch.profiler traces (*.pt.trace.json[.gz])")
    parser.add_argument("--out", required=True, help="folder for the PNGs, summary.json, requests.csv and report.html "
                        "(created; never read back as input)")
    parser.add_argument("--run", metavar="ID", help="report only this run (otel_moe.run_id); default: every run in the "
                        "input, each in a folder of its own when there are several")
    parser.add_argument("--layers", metavar="SEL", type=_layer_selection,
                        help="layers you care about, e.g. '0,5-7': they get per-layer files and lead the "
                             "position figure")
    parser.add_argument("--per-layer-files", action=argparse.BooleanOptionalAction, default=None,
                        help="also write expert_hist_layer{N}.png (and _by_phase) per layer; default: for the --layers "
                             f"given, or for every layer when there are at most {MAX_PER_LAYER_FILES_AUTO}")
    parser.add_argument("--profile", action="append", default=[], metavar="TRACE",
                        help="a torch.profiler trace of the same run (Chrome JSON, .gz too) or a folder of them; "
                             "repeatable")
    parser.add_argument("--moe-kernels", default=profile.DEFAULT_MOE_KERNELS, metavar="REGEX", type=_regex,
                        help="GPU kernel names that are MoE work, for CUDA-graph replays (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                        help="draw the PNGs (default); --no-figures writes summary.json, requests.csv and report.html alone, "
                             "in a fraction of the time")


def _layer_selection(text: str) -> Optional[frozenset[int]]:
    try:
        return parse_ranges(text)  # None: all
    except RangeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: {err}") from None


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({err})") from None
    return text


class ReportError(ValueError):
    """A problem with the command line's paths, said in one line."""


def build_report(inputs: list[str], out_dir: str, progress: bool = False, traces: list[str] = (),
                 moe_kernels: str = profile.DEFAULT_MOE_KERNELS, run: Optional[str] = None,
                 layers: Optional[frozenset[int]] = None, per_layer_files: Optional[bool] = None,
                 figures: bool = True) -> dict:
    """Returns the run's summary.json content, or for several runs an index
    ({"runs": {name: summary}}); ``traces``: profiler traces to join (also
    picked out of ``inputs`` by name); ``figures``: draw the PNGs (else the
    numbers and the page alone)."""
    from otel_moe.report.build import aggregate, inputs_section, run_summary
    from otel_moe.report.inputs import input_files

    _check_out(out_dir)
    is_trace = [profile.is_trace(p) or (os.path.isdir(p) and bool(profile.trace_files([p]))) for p in inputs]
    traces = list(traces) + [p for p, t in zip(inputs, is_trace) if t]
    inputs = [p for p, t in zip(inputs, is_trace) if not t]
    join = profile.load(traces, moe_kernels) if traces else None
    stats = LineStats()
    files = input_files(inputs)
    meter = Progress("reading", progress)
    meter.total(sum(os.path.getsize(f) for f in files))
    runs = aggregate(inputs, stats, meter.add, profile=join, only_run=run)
    meter.done()
    names = sorted(runs)
    folders = _run_folders(names) if len(names) > 1 else {names[0]: ""}
    results = {}
    for name in names:
        result = run_summary(name, runs[name], stats, files, names)
        if join is not None:
            result["profile"] = join.summary(set(runs), name)
        folder = os.path.join(out_dir, folders[name])
        os.makedirs(folder, exist_ok=True)
        _write_run(folder, result, runs[name], layers, per_layer_files, progress, figures)
        results[name] = result
    if len(names) == 1:
        return results[names[0]]
    from otel_moe.report import html

    index = {"schema": results[names[0]]["schema"], "inputs": inputs_section(stats, files),
             "runs": {name: {"folder": folders[name], "steps": r["steps"], "requests": len(r["requests"]),
                             "layers": len(r["layers"])} for name, r in results.items()}}
    _write_json(os.path.join(out_dir, "summary.json"), index)
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(html.render_index(index))
    return {**index, "runs": results}


def _check_out(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReportError(f"--out {out_dir} is a file, not a folder")


def _run_folders(names: list[str]) -> dict[str, str]:
    folders: dict[str, str] = {}
    for name in names:
        base = "run-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "unnamed")
        folder, n = base, 1
        while folder in folders.values():
            n += 1
            folder = f"{base}-{n}"
        folders[name] = folder
    return folders


def _write_run(folder: str, result: dict, run, layers_wanted: Optional[frozenset[int]],
               per_layer_files: Optional[bool], progress: bool, figures: bool = True) -> None:
    from otel_moe.report import html, plots

    layer_names = list(result["layers"])
    tasks: list[tuple[str, Callable[[], object]]] = [
        ("heatmap", lambda: plots.heatmap(folder, result["layers"])),
        ("imbalance_heatmap", lambda: plots.imbalance_heatmap(folder, run)),
        ("imbalance", lambda: plots.imbalance(folder, run)),
        ("latency", lambda: plots.latency(folder, result["requests"])),
        ("cooccurrence", lambda: plots.cooccurrence(folder, run, _cooccurrence_layers(result))),
        ("position", lambda: plots.position_expert(folder, run, _position_layers(result, layers_wanted))),
        ("confidence", lambda: plots.router_confidence(folder, run)),
    ]
    if "profile" in result:
        tasks.append(("profile", lambda: plots.profile(folder, result["profile"])))
    pages = [layer_names[i:i + plots.LAYERS_PER_PAGE] for i in range(0, len(layer_names), plots.LAYERS_PER_PAGE)]
    for page, names in enumerate(pages):
        tasks.append((f"grid{page}", lambda page=page, names=names: plots.histogram_grid(folder, result["layers"], page, names)))
    for name in _per_layer_file_layers(layer_names, layers_wanted, per_layer_files):
        layer = result["layers"][name]
        tasks.append((f"hist{name}", lambda name=name, layer=layer: plots.expert_histogram(folder, name, layer["counts"])))
        if sum(layer["prefill_counts"]) + sum(layer["decode_counts"]):
            tasks.append((f"phase{name}", lambda name=name, layer=layer: plots.phase_histogram(
                folder, name, layer["prefill_counts"], layer["decode_counts"])))
    if not figures:
        tasks = []
    meter = Progress("drawing", progress)
    meter.total(len(tasks))
    images = {}
    for key, draw in tasks:
        images[key] = draw()
        meter.add(1)
    meter.done()
    images["grid_pages"] = [(images[f"grid{page}"], names) for page, names in enumerate(pages) if f"grid{page}" in images]
    _write_json(os.path.join(folder, "summary.json"), result)
    _write_requests_csv(os.path.join(folder, "requests.csv"), result)
    with open(os.path.join(folder, "report.html"), "w") as f:
        f.write(html.render(result, images))


def _per_layer_file_layers(names: list[str], wanted: Optional[frozenset[int]], flag: Optional[bool]) -> list[str]:
    if flag is False:
        return []
    if wanted:
        return [n for n in names if int(n) in wanted]
    return names if flag or len(names) <= MAX_PER_LAYER_FILES_AUTO else []


def _cooccurrence_layers(result: dict) -> list[int]:
    """The layers whose most frequent expert pair is the most frequent."""
    layers = result["cooccurrence"]["layers"]
    ranked = sorted(layers, key=lambda n: -(layers[n]["top_pairs"][0]["share"] if layers[n]["top_pairs"] else 0))
    return sorted(int(n) for n in ranked[:COOCCURRENCE_LAYERS])


def _position_layers(result: dict, wanted: Optional[frozenset[int]]) -> list[int]:
    """The layers asked for, else those whose expert choice depends most on position."""
    layers = result["position_expert"]["layers"]
    if wanted:
        return sorted(int(n) for n in layers if int(n) in wanted)[:POSITION_LAYERS]

    def dependence(name: str) -> float:
        rows = [r for phase in layers[name].values() for r in phase]
        total = sum(r["assignments"] for r in rows) or 1
        return sum(r["js_divergence_bits"] * r["assignments"] for r in rows) / total

    return sorted(int(n) for n in sorted(layers, key=lambda n: -dependence(n))[:POSITION_LAYERS])


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(_strict(data), f, indent=1, allow_nan=False)


def _strict(value):
    """Strict JSON: any NaN or infinity left (a profiler trace's numbers, say) becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _write_requests_csv(path: str, result: dict) -> None:
    layers = result["request_layers"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["request_id", "tokens", "prefill_tokens", "decode_tokens", "ttft_ms", "tpot_ms", "e2e_ms", "trace_id",
                         "expert_entropy_bits", "hot_expert_share_mean"] + [f"hot_expert_share_layer{n}" for n in layers])
        for request_id, r in result["requests"].items():
            hot = r["hot_expert_share_by_layer"] or [None] * len(layers)
            writer.writerow([request_id, r["tokens"], r["prefill_tokens"], r["decode_tokens"],
                             *(_csv(r[k], 1000) for k in ("ttft_s", "tpot_s", "e2e_s")), r["trace_id"] or "",
                             _csv(r["expert_entropy_bits"]), _csv(r["hot_expert_share_mean"]), *(_csv(h) for h in hot)])


def _csv(value: Optional[float], scale: float = 1.0) -> str:
    return "" if value is None else f"{value * scale:.6g}"


def run(args: argparse.Namespace) -> int:
    from otel_moe.report.analyses import sampling_line
    from otel_moe.report.build import EmptyInput, SchemaError, input_warnings

    try:
        result = build_report(args.inputs, args.out, progress=not args.no_progress and sys.stderr.isatty(),
                              traces=args.profile, moe_kernels=args.moe_kernels, run=args.run, layers=args.layers,
                              per_layer_files=args.per_layer_files, figures=args.figures)
    except (EmptyInput, SchemaError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError,
            ReportError, profile.TraceError) as err:
        print(f"otel-moe report: error: {err}", file=sys.stderr)
        return 2
    for line in input_warnings(result["inputs"]):
        print(f"otel-moe report: {line}", file=sys.stderr)
    several = "run" not in result
    folders = _run_folders(sorted(result["runs"])) if several else {result["run"]: ""}
    for name, r in (result["runs"].items() if several else [(result["run"], result)]):
        missing = sorted(set(args.layers or ()) - {int(n) for n in r["layers"]})
        if missing:
            print(f"otel-moe report: warning: --layers: run {name} has no layer {format_ranges(missing)} "
                  f"(its layers: {format_ranges(sorted(int(n) for n in r['layers']))})", file=sys.stderr)
        where = os.path.join(args.out, folders[name], "report.html")
        print(f"otel-moe report: run {name}: {len(r['layers'])} layers, {len(r['requests'])} requests -> {where}")
        if sampling_line(r):
            print(f"otel-moe report: run {name}: {sampling_line(r)}")
        if "profile" in r:
            p = r["profile"]
            print(f"otel-moe report: profiler trace: {p['steps_joined']} of {p['steps_in_trace']} profiled steps joined "
                  f"({', '.join(p['time_source'])})")
        if latency_line(r["latency"]):
            print(f"otel-moe report:   {latency_line(r['latency'])}")
    return 0


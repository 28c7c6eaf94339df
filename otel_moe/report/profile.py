"""Join a torch.profiler trace (vLLM's ``--profiler-config``; Chrome JSON, .gz
too) with the routing records: per-layer MoE time beside per-layer load
imbalance, over the same engine steps.

The trace names each recorded step (``otel_moe.step <index> ...``, see
``otel_moe.worker.profiler_ranges``), with the same index as the step's record, so
the join is exact: (run id, DP rank, step index). Per step and MoE layer the
time is, from the best source the trace has:
  - ``gpu kernels in layer ranges``: GPU kernels launched inside the layer's
    ``otel_moe.layer N`` range (the layer's Python ran: eager, or a compiled
    model without CUDA graphs);
  - ``layer ranges (cpu)``: no GPU activity (the CPU backend): the range itself;
  - ``gpu kernels by order`` / ``cpu ops by order``: no layer ranges (CUDA-graph
    replays run no Python; on CPU torch.compile traces the layer into its
    graph). Each MoE kernel or op name (``--moe-kernels``) then occurs the same
    number of times in every MoE layer, so its j-th occurrence in a step
    belongs to the (j // per-layer)-th of the step's ``moe_layers``.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import gzip
import json
import os
import re
from typing import Iterable, Optional

import numpy as np

from otel_moe import schema

DEFAULT_MOE_KERNELS = r"moe|expert|topk|top_k"
HOST_RANGE_CATEGORY = "user_annotation"
KERNEL_CATEGORIES = ("kernel",)
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
TRACE_SUFFIXES = (".pt.trace.json", ".pt.trace.json.gz")
MAX_POINTS = 20000  # (step, layer) pairs kept for the scatter plot


class TraceError(ValueError):
    """Not a torch.profiler Chrome trace."""


@dataclasses.dataclass
class ProfiledStep:
    run_id: str
    dp_rank: int
    step: int
    tokens: int
    moe_layers: list[int]
    layer_us: dict[int, float]  # MoE layer -> time in this step
    source: str


def is_trace(path: str) -> bool:
    return path.endswith(TRACE_SUFFIXES)


def trace_files(paths: Iterable[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(sorted(os.path.join(path, n) for n in os.listdir(path) if is_trace(n)))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"no such profiler trace: {path}")
    return files


def load_events(path: str) -> list[dict]:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        trace = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TraceError(f"{path} is not a Chrome-trace JSON file: {err}") from None
    events = trace.get("traceEvents") if isinstance(trace, dict) else trace
    if not isinstance(events, list):
        raise TraceError(f"{path} has no traceEvents: not a torch.profiler trace")
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]


def profiled_steps(events: list[dict], moe_kernels: str = DEFAULT_MOE_KERNELS) -> list[ProfiledStep]:
    """Every ``otel_moe.step`` range of one trace, with its per-layer MoE time."""
    steps, layer_ranges, cpu_ops = [], collections.defaultdict(list), collections.defaultdict(list)
    matcher = re.compile(moe_kernels, re.IGNORECASE)
    for e in events:
        name = e.get("name", "")
        thread = (e.get("pid"), e.get("tid"))
        if e.get("cat") == "cpu_op" and matcher.search(name):
            cpu_ops[thread].append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), name))
        # Kineto mirrors each range onto the GPU timeline ("gpu_user_annotation",
        # spanning the GPU's time, idle gaps included): only the host's ranges count.
        if not name.startswith("otel_moe.") or e.get("cat") != HOST_RANGE_CATEGORY:
            continue
        fields = schema.parse_step_range(name)
        if fields is not None:
            steps.append((e, fields))
        elif (layer := schema.parse_layer_range(name)) is not None:
            layer_ranges[thread].append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), layer))
    for items in (*layer_ranges.values(), *cpu_ops.values()):
        items.sort()
    kernels = _kernels_by_launch(events)
    out = []
    for e, fields in steps:
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        thread = (e.get("pid"), e.get("tid"))
        ranges = _within(layer_ranges.get(thread, []), start, end)
        launched = _within(kernels.get(e.get("pid"), []), start, end)
        if kernels and not launched:
            layer_us, source = {}, "no gpu kernels linked to the step"
        elif ranges and launched:
            layer_us, source = _kernels_in_ranges(launched, ranges), "gpu kernels in layer ranges"
        elif ranges:
            layer_us, source = {layer: 0.0 for _, _, layer in ranges}, "layer ranges (cpu)"
            for r_start, r_end, layer in ranges:
                layer_us[layer] += r_end - r_start
        elif launched:
            work = [(name, dur) for _, _, name, dur in sorted(launched, key=lambda k: k[1]) if matcher.search(name)]
            layer_us, source = _by_order(work, fields["moe_layers"]), "gpu kernels by order"
        else:
            work = [(name, op_end - op_start) for op_start, op_end, name in _outermost(_within(cpu_ops.get(thread, []), start, end))]
            layer_us, source = _by_order(work, fields["moe_layers"]), "cpu ops by order"
        out.append(ProfiledStep(fields["run_id"], fields["dp_rank"], fields["step"], fields["tokens"],
                                fields["moe_layers"], layer_us, source))
    return out


def _within(items: list[tuple], start: float, end: float) -> list[tuple]:
    """Items (sorted tuples led by a timestamp) that begin inside [start, end]."""
    return items[bisect.bisect_left(items, (start,)):bisect.bisect_right(items, (end, float("inf")))]


def _kernels_by_launch(events: list[dict]) -> dict:
    """pid of the launching process -> [(launch ts, kernel start, kernel name, kernel dur)], by launch."""
    launches = {}
    for e in events:
        if e.get("cat") in LAUNCH_CATEGORIES:
            correlation = (e.get("args") or {}).get("correlation")
            if correlation is not None:
                launches[correlation] = e
    out = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in KERNEL_CATEGORIES:
            launch = launches.get((e.get("args") or {}).get("correlation"))
            if launch is not None:
                out[launch.get("pid")].append((float(launch["ts"]), float(e["ts"]), e.get("name", ""), float(e["dur"])))
    for kernels in out.values():
        kernels.sort()
    return out


def _kernels_in_ranges(kernels: list[tuple], ranges: list[tuple]) -> dict[int, float]:
    layer_us = {layer: 0.0 for _, _, layer in ranges}
    for launch, _, _, dur in kernels:
        for r_start, r_end, layer in ranges:
            if r_start <= launch <= r_end:
                layer_us[layer] += dur
                break
    return layer_us


def _outermost(ops: list[tuple]) -> list[tuple]:
    """Drop matching ops nested in another matching op (a wrapper op and its kernel)."""
    out, busy_until = [], float("-inf")
    for op in ops:
        if op[0] >= busy_until:
            out.append(op)
            busy_until = op[1]
    return out


def _by_order(work: list[tuple[str, float]], moe_layers: list[int]) -> dict[int, float]:
    """Attribute MoE work items (name, duration; in execution order) to layers.

    Every MoE layer runs the same sequence of MoE kernels, so a name occurring
    a multiple of len(moe_layers) times splits into equal runs, one per layer.
    Names that do not are not per-layer MoE work and are left out."""
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, dur in work:
        by_name[name].append(dur)
    layer_us: dict[int, float] = collections.defaultdict(float)
    for durations in by_name.values():
        if not moe_layers or len(durations) % len(moe_layers):
            continue
        per_layer = len(durations) // len(moe_layers)
        for j, dur in enumerate(durations):
            layer_us[moe_layers[j // per_layer]] += dur
    return dict(layer_us)


class ProfileJoin:
    """Collects the routing of the profiled steps while the report streams its input."""

    def __init__(self, steps: list[ProfiledStep], files: list[str]) -> None:
        self.steps = steps
        self.files = files
        self._wanted_steps = {(s.dp_rank, s.step) for s in steps}
        self.counts: dict[tuple, dict[int, np.ndarray]] = collections.defaultdict(dict)  # key -> layer -> [E]
        self.tokens: dict[tuple, int] = collections.Counter()

    def add(self, run: str, dp_rank: int, step: int, layer_counts: dict[int, np.ndarray], tokens: int) -> None:
        """One record (or one chunk of a step's record) of the routing input."""
        if (dp_rank, step) not in self._wanted_steps:
            return
        key = (run, dp_rank, step)
        self.tokens[key] += tokens
        have = self.counts[key]
        for layer, counts in layer_counts.items():
            have[layer] = have[layer] + counts if layer in have else counts.astype(np.int64)

    def _routing_run(self, trace_run: str, input_runs: set[str]) -> Optional[str]:
        """The input run a trace's run id names; a lone JSONL log (no run id)
        joins a trace that holds one run."""
        if trace_run in input_runs:
            return trace_run
        if len(input_runs) == 1 and len({s.run_id for s in self.steps}) == 1:
            return next(iter(input_runs))
        return None

    def summary(self, input_runs: set[str], run: Optional[str] = None) -> dict:
        """The join over the steps of ``run`` (None: of every input run)."""
        per_layer: dict[int, dict] = {}
        points, mismatched, joined = [], 0, 0
        for s in self.steps:
            key = (self._routing_run(s.run_id, input_runs), s.dp_rank, s.step)
            counts = self.counts.get(key)
            if counts is None or (run is not None and key[0] != run):
                continue
            joined += 1
            if self.tokens[key] != s.tokens:
                mismatched += 1
            for layer, us in s.layer_us.items():
                entry = per_layer.setdefault(layer, {"steps": 0, "moe_us": 0.0, "_imb": [], "_per_token": []})
                entry["steps"] += 1
                entry["moe_us"] += us
                if layer in counts and counts[layer].mean() > 0:
                    imbalance = float(counts[layer].max() / counts[layer].mean())
                    entry["_imb"].append(imbalance)
                    entry["_per_token"].append(us / s.tokens)
                    if len(points) < MAX_POINTS:
                        points.append([layer, s.step, us, imbalance, s.tokens])
        layers = {}
        for layer in sorted(per_layer):
            e = per_layer[layer]
            layers[str(layer)] = {
                "steps": e["steps"],
                "moe_us_total": e["moe_us"],
                "moe_us_mean": e["moe_us"] / e["steps"],
                "imbalance_max_over_mean_mean": float(np.mean(e["_imb"])) if e["_imb"] else None,
                # does this layer's time per token rise with its imbalance, step to step?
                "time_per_token_imbalance_correlation": _correlation(e["_per_token"], e["_imb"]),
            }
        return {
            "traces": self.files,
            "steps_in_trace": len(self.steps),
            "steps_joined": joined,
            "steps_with_other_token_count": mismatched,
            "time_source": sorted({s.source for s in self.steps}),
            "layers": layers,
            "points": points,  # [layer, step, moe_us, max/mean, step tokens]
        }


def _correlation(x: list[float], y: list[float]) -> Optional[float]:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def load(paths: list[str], moe_kernels: str = DEFAULT_MOE_KERNELS) -> ProfileJoin:
    steps, files = [], trace_files(paths)
    for path in files:
        steps.extend(profiled_steps(load_events(path), moe_kernels))
    if not steps:
        raise TraceError(f"no {schema.STEP_RANGE} ranges in {', '.join(paths)}: was VLLM_LOG_MOE set and recording on "
                         "while the profiler ran?")
    return ProfileJoin(steps, files)

"""Report inputs, streamed: collector files (OTLP/JSON) and JSONL routing logs,
in any mix, as files or folders. Each step becomes one ``StepRouting``; every
record is checked (``validate``) and a bad one skipped and counted by reason."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Optional

import numpy as np

from otel_moe import schema
from otel_moe.report import read, validate
from otel_moe.report.read import LineStats
from otel_moe.report.validate import BadRecord


@dataclasses.dataclass
class LayerBatch:
    layer: int
    num_experts: int
    counts: np.ndarray  # [E]
    num_tokens: int
    ids: Optional[np.ndarray] = None  # [n, K]
    weights: Optional[np.ndarray] = None
    request_of: Optional[np.ndarray] = None  # [n] index into StepRouting.request_ids
    prefill: Optional[np.ndarray] = None  # [n] bool
    positions: Optional[np.ndarray] = None  # [n] token positions in their requests


@dataclasses.dataclass
class StepRouting:
    run: str
    step: int
    request_ids: list[str]
    request_tokens: np.ndarray
    prefill_tokens: np.ndarray
    layers: list[LayerBatch]
    dp_rank: int = 0
    unsampled_tokens: int = 0  # tokens of requests not sampled: in no layer's counts here


@dataclasses.dataclass
class RequestTally:
    """A counts-mode ``moe.request`` span: its steps' spans name no requests, so this
    is where the run's per-request token counts come from."""

    run: str
    request_id: str
    prefill_tokens: int
    decode_tokens: int


@dataclasses.dataclass
class Latency:
    run: Optional[str]  # None when vLLM's span carries no otel-moe run id
    request_id: str
    e2e_s: Optional[float]
    ttft_s: Optional[float]
    queue_s: Optional[float]
    completion_tokens: Optional[int]
    trace_id: str = ""  # the request's trace (otel-moe's moe.request is in it too, when sampled)


def input_files(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(read.collector_files(path))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"no such input: {path}")
    return files


def step_from_span(span: read.Span) -> StepRouting:
    a = span.attributes
    validate.num_experts(a.get(schema.NUM_EXPERTS))  # before anything of its size is built
    validate.top_k(a.get(schema.TOP_K))
    try:
        step = read.decode_step(span)
    except read.SchemaError:
        raise
    except (KeyError, ValueError, TypeError):
        raise BadRecord("malformed moe.step span") from None
    _check_step(step)
    if not step.ids:  # counts mode: a window of steps, its tokens not laid out per request
        layers = [LayerBatch(layer, step.num_experts, counts, step.num_tokens) for layer, counts in sorted(step.counts.items())]
        return StepRouting(step.run, step.step, [], np.zeros(0, np.int64), np.zeros(0, np.int64), layers, step.dp_rank)
    request_of = np.repeat(np.arange(len(step.request_ids)), step.request_tokens)
    positions = step.positions()
    prefill = step.is_prefill()
    prefill_tokens = np.bincount(request_of[prefill], minlength=len(step.request_ids))
    layers = [
        LayerBatch(layer, step.num_experts, step.counts[layer], step.num_tokens,
                   step.ids.get(layer), step.weights.get(layer),
                   *((request_of, prefill, positions) if layer in step.ids else (None, None, None)))
        for layer in sorted(step.counts)
    ]
    return StepRouting(step.run, step.step, step.request_ids, step.request_tokens, prefill_tokens, layers, step.dp_rank,
                       step.unsampled_tokens)


def _check_step(step: read.StepSpan) -> None:
    validate.whole(step.step, "step index")
    for layer, counts in step.counts.items():
        validate.layer(layer)
        if layer not in step.ids and len(counts) != step.num_experts:  # token layers: checked by id below
            raise BadRecord("expert counts not num_experts long")
    if step.window_tokens is not None:
        validate.whole(step.window_tokens, "num_tokens")
    validate.whole(step.unsampled_tokens, "unsampled_tokens")
    if not step.ids:
        return
    lengths = {len(step.request_ids), len(step.request_tokens), len(step.first_positions), len(step.prompt_lens)}
    if len(lengths) != 1:
        raise BadRecord("per-request arrays differ in length")
    if not all(isinstance(r, str) for r in step.request_ids):
        raise BadRecord("request id not a string")
    rows = int(step.request_tokens.sum())
    for layer, ids in step.ids.items():
        if ids.shape != (rows, step.top_k) or step.weights[layer].shape != ids.shape:
            raise BadRecord("request_tokens do not match the rows")
        validate.expert_ids(ids, step.num_experts)
        validate.weights(step.weights[layer])


def latency_from_span(span: read.Span) -> Latency:
    a = span.attributes
    run = span.resource.get(schema.RUN_ID)
    tokens = a.get(schema.VLLM_COMPLETION_TOKENS)
    return Latency(run, str(a.get(schema.REQUEST_ID)), validate.seconds(a.get(schema.VLLM_E2E), "e2e latency"),
                   validate.seconds(a.get(schema.VLLM_TTFT), "time to first token"),
                   validate.seconds(a.get(schema.VLLM_QUEUE), "time in queue"),
                   validate.whole(tokens, "completion tokens") if tokens is not None else None,
                   span.trace_id if isinstance(span.trace_id, str) else "")


def tally_from_span(span: read.Span) -> RequestTally:
    a = span.attributes
    read.check_schema(a)
    request_id = a.get(schema.REQUEST_ID)
    if not isinstance(request_id, str):
        raise BadRecord("request id not a string")
    return RequestTally(read.run_key(span.resource), request_id, validate.whole(a.get(schema.PREFILL_TOKENS), "prefill tokens"),
                        validate.whole(a.get(schema.DECODE_TOKENS), "decode tokens"))


class JsonlSteps:
    """Groups a JSONL log's rows (one per token per layer, or per step per layer) into steps.
    Rows are checked one by one as they come: a bad row is refused alone."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.step: Optional[int] = None
        self.rows: list[dict] = []
        self._shape: dict[int, tuple] = {}  # layer -> (top_k or counts length, num_experts) in this step

    def add(self, row: dict) -> Optional[StepRouting]:
        validate.jsonl_row(row)
        done = None
        if row["step"] != self.step and self.rows:
            done = self.flush()
        self.step = row["step"]
        shape = (len(row["counts"]) if "counts" in row else len(row["expert_ids"]), row.get("num_experts"), "counts" in row)
        if self._shape.setdefault(row["layer"], shape) != shape:
            raise BadRecord("row shape differs from its layer's other rows in the step")
        if self.rows and ("counts" in row) != ("counts" in self.rows[0]):
            raise BadRecord("counts and token rows mixed in one step")
        self.rows.append(row)
        return done

    def flush(self) -> Optional[StepRouting]:
        rows, self.rows, self._shape = self.rows, [], {}
        if not rows:
            return None
        by_layer: dict[int, list[dict]] = {}
        for row in rows:
            by_layer.setdefault(row["layer"], []).append(row)
        if "counts" in rows[0]:
            layers = [LayerBatch(layer, len(r[0]["counts"]), np.asarray(r[0]["counts"], np.int64), int(r[0]["num_tokens"]))
                      for layer, r in sorted(by_layer.items())]
            return StepRouting(self.run, self.step, [], np.zeros(0, np.int64), np.zeros(0, np.int64), layers)
        index: dict[str, int] = {}
        layers = []
        for layer, layer_rows in sorted(by_layer.items()):
            ids = np.asarray([r["expert_ids"] for r in layer_rows], dtype=np.int64)
            request_of = np.asarray([index.setdefault(r["request_id"], len(index)) for r in layer_rows])
            prefill = np.asarray([r["phase"] == "prefill" for r in layer_rows])
            positions = np.asarray([r["position"] for r in layer_rows], dtype=np.int64)
            # lines written before num_experts was added: size by the largest id seen
            num_experts = layer_rows[0].get("num_experts") or int(ids.max()) + 1
            layers.append(LayerBatch(layer, num_experts, np.bincount(ids.ravel(), minlength=num_experts), len(layer_rows),
                                     ids, np.asarray([r["expert_weights"] for r in layer_rows], dtype=np.float32),
                                     request_of, prefill, positions))
        request_ids = list(index)
        first = layers[0]
        tokens = np.bincount(first.request_of, minlength=len(request_ids))
        prefill_tokens = np.bincount(first.request_of[first.prefill], minlength=len(request_ids))
        return StepRouting(self.run, self.step, request_ids, tokens, prefill_tokens, layers)


def stream(paths: list[str], stats: LineStats, on_bytes: Callable[[int], None] = lambda n: None
           ) -> Iterator[StepRouting | Latency | MetricsWindow | RequestTally]:
    metrics = MetricsDeltas(stats)
    for file in input_files(paths):
        jsonl: Optional[JsonlSteps] = None
        with open(file, "rb") as f:
            for raw in read.file_lines(f):
                on_bytes(len(raw))
                stats.lines += 1
                try:
                    item = read.parse_line(raw)
                except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
                    stats.bad_lines += 1
                    continue
                if not isinstance(item, dict):
                    stats.bad_lines += 1
                elif "resourceSpans" in item:
                    yield from _otlp_items(item, stats)
                elif "resourceMetrics" in item:
                    yield from metrics.add(item)
                elif "layer" in item and "step" in item:
                    jsonl = jsonl or JsonlSteps(f"jsonl:{os.path.basename(file)}")
                    try:
                        done = jsonl.add(item)
                    except BadRecord as err:
                        stats.skip(str(err))
                        continue
                    except Exception as err:  # a record this reader did not foresee: it alone is lost
                        stats.skip(unexpected(err))
                        continue
                    if done is not None:
                        yield done
                else:
                    stats.bad_lines += 1  # neither OTLP/JSON nor an otel-moe JSONL row
        if jsonl is not None:
            done = jsonl.flush()
            if done is not None:
                yield done


@dataclasses.dataclass
class MetricsWindow:
    """What ``moe.expert.tokens`` grew by between two exports of one process: a window
    of steps without step indices (aggregate() uses it only for runs without moe.step spans)."""

    batch: StepRouting


class MetricsDeltas:
    """Cumulative ``moe.expert.tokens`` points -> per-export deltas per layer."""

    def __init__(self, stats: LineStats) -> None:
        self.stats = stats
        self._last: dict[tuple, float] = {}  # (run, dp rank, layer, expert, phase) -> cumulative value
        self._windows: dict[str, int] = {}  # run -> windows so far

    def add(self, request: dict) -> Iterator[MetricsWindow]:
        grown: dict[tuple[str, int], dict[int, dict[int, int]]] = {}
        sizes: dict[str, int] = {}  # run -> its experts, where the resource says (a layer's unused experts count too)
        for resource_metrics in request.get("resourceMetrics") or []:
            try:
                resource = schema.attributes((resource_metrics.get("resource") or {}).get("attributes", []))
                run = read.run_key(resource)
                if resource.get(schema.NUM_EXPERTS) is not None:
                    sizes[run] = validate.num_experts(resource[schema.NUM_EXPERTS])
                points = [point for scope in resource_metrics.get("scopeMetrics") or []
                          for metric in scope.get("metrics") or [] if metric.get("name") == schema.METRIC_EXPERT_TOKENS
                          for point in (metric.get("sum") or {}).get("dataPoints") or []]
            except (ValueError, TypeError, AttributeError, KeyError, BadRecord):
                self.stats.skip("malformed metrics")
                continue
            for point in points:  # a bad point is skipped alone
                try:
                    self._point(run, point, grown)
                except BadRecord as err:
                    self.stats.skip(f"{schema.METRIC_EXPERT_TOKENS}: {err}")
                except (ValueError, TypeError, AttributeError, KeyError):
                    self.stats.skip("malformed metrics")
                except Exception as err:
                    self.stats.skip(unexpected(err))
        for (run, dp_rank), layers in grown.items():
            batches = []
            for layer, experts in sorted(layers.items()):
                counts = np.zeros(max(max(experts) + 1, sizes.get(run, 0)), np.int64)
                for expert, n in experts.items():
                    counts[expert] += n
                batches.append(LayerBatch(layer, len(counts), counts, int(counts.sum())))
            index = self._windows[run] = self._windows.get(run, -1) + 1
            yield MetricsWindow(StepRouting(run, index, [], np.zeros(0, np.int64), np.zeros(0, np.int64), batches, dp_rank))

    def _point(self, run: str, point: dict, grown: dict) -> None:
        a = schema.attributes(point.get("attributes", []))
        if a.get("otel.metric.overflow"):
            raise BadRecord("the SDK's overflow point (its series limit was reached: totals past it are lost)")
        layer, expert = validate.layer(int(a[schema.LAYER])), int(a["moe.expert"])
        validate.whole(expert, "expert", 0, validate.MAX_EXPERTS - 1)
        dp_rank = int(a.get("otel_moe.dp_rank", 0))
        value = float(point["asInt"]) if "asInt" in point else float(point.get("asDouble", 0))
        key = (run, dp_rank, layer, expert, a.get("moe.phase", ""))
        last = self._last.get(key, 0.0)
        delta = value - last if value >= last else value  # a smaller value: the process restarted
        self._last[key] = value
        if delta > 0:
            experts = grown.setdefault((run, dp_rank), {}).setdefault(layer, {})
            experts[expert] = experts.get(expert, 0) + int(delta)


def _otlp_items(request: dict, stats: LineStats) -> Iterator[StepRouting | Latency | RequestTally]:
    for span in read.iter_spans(request, stats.skip):
        try:
            if span.name == schema.STEP_SPAN:
                yield step_from_span(span)
            elif span.name == schema.VLLM_REQUEST_SPAN:
                yield latency_from_span(span)
            elif span.name == schema.REQUEST_SPAN and span.attributes.get(schema.MODE) == "counts":
                yield tally_from_span(span)
        except BadRecord as err:
            stats.skip(f"{span.name}: {err}")
        except read.SchemaError:
            raise
        except Exception as err:
            stats.skip(f"{span.name}: {unexpected(err)}")


def unexpected(err: Exception) -> str:
    """The reason a record is skipped under when reading it failed in a way no check foresaw."""
    return f"unexpected {type(err).__name__}: {str(err)[:120]}"

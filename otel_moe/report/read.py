"""Reading routing back: OTLP/JSON collector files and JSONL logs, streamed.

One decoder for the report and the tests. Corrupt or truncated lines are
skipped and counted (a live file's last line may be partial), never fatal.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import BinaryIO, Callable, Iterator, Optional

import msgspec
import numpy as np

from otel_moe import schema
from otel_moe.schema import DECODE, PREFILL


class SchemaError(ValueError):
    """Input written by an otel-moe schema version this reader does not know."""


@dataclasses.dataclass
class LineStats:
    lines: int = 0
    bad_lines: int = 0  # not JSON, or not an object
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # records, by reason

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1


@dataclasses.dataclass
class Span:
    name: str
    resource: dict
    attributes: dict
    start_ns: int
    end_ns: int
    events: list  # [(name, attributes)]
    trace_id: str = ""
    span_id: str = ""
    parent_span_id: str = ""  # "": a root span


@dataclasses.dataclass
class StepSpan:
    """One decoded ``moe.step`` span (one chunk of a step)."""

    run: str
    step: int
    chunk: int
    start_ns: int
    end_ns: int
    top_k: int
    num_experts: int
    request_ids: list[str]
    request_tokens: np.ndarray
    first_positions: np.ndarray
    prompt_lens: np.ndarray
    ids: dict[int, np.ndarray]  # layer -> [n, K] (tokens mode)
    weights: dict[int, np.ndarray]
    counts: dict[int, np.ndarray]  # layer -> [E] (both modes)
    dropped_steps: int = 0
    dp_rank: int = 0
    last_step: Optional[int] = None  # counts mode: the span covers steps step..last_step
    window_tokens: Optional[int] = None
    unsampled_tokens: int = 0  # the step's tokens of unsampled requests, not in the span

    @property
    def num_tokens(self) -> int:
        return self.window_tokens if self.window_tokens is not None else int(self.request_tokens.sum())

    def positions(self) -> np.ndarray:
        offsets = np.arange(self.num_tokens) - np.repeat(np.cumsum(self.request_tokens) - self.request_tokens, self.request_tokens)
        return np.repeat(self.first_positions, self.request_tokens) + offsets

    def is_prefill(self) -> np.ndarray:
        return self.positions() < np.repeat(self.prompt_lens, self.request_tokens)

    def token_rows(self) -> Iterator[dict]:
        """The same objects the JSONL sink writes for these tokens (tokens mode)."""
        request_of = np.repeat(np.arange(len(self.request_ids)), self.request_tokens)
        positions, prefill = self.positions(), self.is_prefill()
        for t in range(self.num_tokens):
            for layer in sorted(self.ids):
                yield {
                    "step": self.step, "layer": layer, "request_id": self.request_ids[request_of[t]],
                    "position": int(positions[t]), "phase": PREFILL if prefill[t] else DECODE,
                    "expert_ids": self.ids[layer][t].tolist(),
                    "expert_weights": [float(w) for w in self.weights[layer][t]],
                    "num_experts": self.num_experts,
                }


READ_CHUNK = 16 << 20


def file_lines(f: BinaryIO) -> Iterator[memoryview]:
    """The lines of a binary file as iterating it gives them (each with its newline, the
    last one without, if the file has none), as views into reads of READ_CHUNK bytes:
    a collector's lines are megabytes, which the file's own line iteration reads in
    small pieces and copies twice. A line longer than a chunk is joined once."""
    pending: list[bytes] = []  # the pieces of a line that began in an earlier chunk
    while True:
        data = f.read(READ_CHUNK)
        if not data:
            if pending:
                yield memoryview(b"".join(pending))
            return
        view, start = memoryview(data), 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                if start < len(data):
                    pending.append(data[start:])
                break
            if pending:
                pending.append(data[start:end + 1])
                yield memoryview(b"".join(pending))
                pending = []
            else:
                yield view[start:end + 1]
            start = end + 1


_decode_json = msgspec.json.Decoder().decode


def parse_line(raw):
    """One line of JSON, as ``json.loads`` reads it: by msgspec's decoder (~3.5x faster
    on a collector's lines), and by ``json.loads`` for what msgspec refuses (NaN, lone
    surrogates, numbers past float's range, malformed lines), so the result or the
    error is ``json.loads``'s own."""
    try:
        return _decode_json(raw)
    except msgspec.DecodeError:
        return json.loads(bytes(raw))


def iter_lines(path: str, stats: LineStats) -> Iterator[dict]:
    with open(path, "rb") as f:
        for raw in file_lines(f):
            stats.lines += 1
            try:
                item = parse_line(raw)
            except (ValueError, RecursionError):
                stats.bad_lines += 1
                continue
            if not isinstance(item, dict):
                stats.bad_lines += 1
                continue
            yield item


def iter_spans(request: dict, on_bad: Callable[[str], None] = lambda reason: None) -> Iterator[Span]:
    """Spans of one OTLP/JSON ExportTraceServiceRequest; a malformed span is
    reported to ``on_bad`` and passed over, its neighbours are not."""
    for resource_spans in _objects(request.get("resourceSpans")):
        try:
            resource = schema.attributes((resource_spans.get("resource") or {}).get("attributes", []))
        except (ValueError, TypeError, AttributeError, KeyError):
            on_bad("malformed resource")
            continue
        for scope_spans in _objects(resource_spans.get("scopeSpans")):
            for span in _objects(scope_spans.get("spans")):
                try:
                    yield _span(span, resource)
                except (ValueError, TypeError, AttributeError, KeyError):
                    on_bad("malformed span")


def _objects(value) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _span(span: dict, resource: dict) -> Span:
    return Span(
        name=span.get("name", ""),
        resource=resource,
        attributes=schema.attributes(span.get("attributes", [])),
        start_ns=int(span.get("startTimeUnixNano", 0)),
        end_ns=int(span.get("endTimeUnixNano", 0)),
        events=[(e.get("name", ""), schema.attributes(e.get("attributes", []))) for e in span.get("events", [])],
        trace_id=span.get("traceId", ""),
        span_id=span.get("spanId", ""),
        parent_span_id=span.get("parentSpanId", ""),
    )


def run_key(resource: dict) -> str:
    """Which run (vLLM process tree) a span came from."""
    return str(resource.get(schema.RUN_ID) or f"{resource.get('service.name', '?')}/{resource.get('process.pid', '?')}")


def check_schema(attributes: dict) -> None:
    version = attributes.get(schema.SCHEMA)
    if version not in schema.READABLE_VERSIONS:
        raise SchemaError(f"otel-moe schema version {version!r} is not supported "
                          f"(this reader knows {', '.join(map(str, schema.READABLE_VERSIONS))})")


def decode_step(span: Span) -> StepSpan:
    a = span.attributes
    check_schema(a)
    top_k = int(a[schema.TOP_K])
    ids, weights, counts = {}, {}, {}
    for name, event in span.events:
        if name != schema.ROUTING_EVENT:
            continue
        layer = int(event[schema.LAYER])
        if schema.EXPERT_IDS in event:
            ids[layer] = schema.decode_ids(event[schema.EXPERT_IDS], event[schema.EXPERT_IDS_DTYPE], top_k)
            weights[layer] = schema.decode_weights(event[schema.EXPERT_WEIGHTS],
                                                   event.get(schema.EXPERT_WEIGHTS_DTYPE, schema.VERSION_1_WEIGHTS_DTYPE), top_k)
            counts[layer] = np.bincount(ids[layer].ravel().astype(np.int64), minlength=int(a[schema.NUM_EXPERTS]))
        else:
            counts[layer] = schema.decode_u32(event[schema.EXPERT_COUNTS])
    return StepSpan(
        run=run_key(span.resource), step=int(a[schema.STEP_INDEX]), chunk=int(a.get(schema.STEP_CHUNK, 0)),
        start_ns=span.start_ns, end_ns=span.end_ns, top_k=top_k, num_experts=int(a[schema.NUM_EXPERTS]),
        request_ids=schema.decode_request_ids(a.get(schema.REQUEST_IDS, [])),
        request_tokens=schema.decode_u32(a.get(schema.REQUEST_TOKENS, b"")),
        first_positions=schema.decode_u32(a.get(schema.REQUEST_FIRST_POSITIONS, b"")),
        prompt_lens=schema.decode_u32(a.get(schema.REQUEST_PROMPT_LENS, b"")),
        ids=ids, weights=weights, counts=counts, dropped_steps=int(a.get(schema.DROPPED_STEPS, 0)),
        dp_rank=int(a.get(schema.DP_RANK, 0)),
        last_step=int(a[schema.STEP_LAST_INDEX]) if schema.STEP_LAST_INDEX in a else None,
        window_tokens=int(a[schema.NUM_TOKENS]) if schema.STEP_LAST_INDEX in a else None,
        unsampled_tokens=int(a.get(schema.STEP_UNSAMPLED_TOKENS, 0)),
    )


# What `otel-moe report` and `compare` write: never read back as input.
REPORT_OUTPUTS = frozenset({"summary.json", "compare.json"})


def collector_files(path: str) -> list[str]:
    """A file, or every collector file in a folder (rotated ones first, live last)."""
    if os.path.isfile(path):
        return [path]
    names = sorted(n for n in os.listdir(path) if n.endswith((".json", ".jsonl")) and n not in REPORT_OUTPUTS
                   and os.path.isfile(os.path.join(path, n)))
    names.sort(key=lambda n: n == "traces.json")  # stable: the live file goes last
    return [os.path.join(path, n) for n in names]


def iter_collector_spans(paths: list[str], stats: Optional[LineStats] = None) -> Iterator[Span]:
    stats = stats or LineStats()
    for path in paths:
        for file in collector_files(path):
            for request in iter_lines(file, stats):
                yield from iter_spans(request)

"""OTLP sink: step records as ``moe.step`` / ``moe.request`` spans, sent by the
OpenTelemetry SDK's own OTLP exporters (gRPC or HTTP/protobuf), configured only by
the standard ``OTEL_*`` variables (``otlp_transport``).

``moe.step`` spans, one or more per engine step, are written straight to protobuf
(``otlp_protobuf``): a step's routing goes from its arrays into the request bytes.
``moe.request`` spans, one per request, are the SDK's own spans and encoding.

A request's ``moe.request`` span goes into the request's own trace (the context
vLLM's front end handed the engine: ``otel_moe.trace_context``), and only when the
request is sampled (``OTEL_TRACES_SAMPLER``); an unsampled request's tokens are
left out of the ``moe.step`` spans too, which count them instead
(``moe.step.unsampled_tokens``). ``moe.step`` spans, the engine's steps, are always
recorded, and the metrics count every token.

It keeps a tracer provider of its own for ``moe.request`` spans (vLLM's, if any, is
left alone) whose processor hands ended spans back to this sink; the sink exports
both kinds from the exporter process in batches cut to stay under receivers'
message limits. A slow or dead collector slows only that process: the shared ring
between it and the worker then fills, the worker drops and counts steps, and the
counts ride on later spans.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Link, SpanContext, TraceFlags

import otel_moe.exporter.sinks.otlp_protobuf as pb
from otel_moe import schema, trace_context
from otel_moe.exporter.records import StepRecord
from otel_moe.exporter.sinks.metrics import open_metrics
from otel_moe.exporter.sinks.otlp_transport import Transport, make_transport

if TYPE_CHECKING:  # open_sinks makes this sink from its spec
    from otel_moe.exporter.sinks import SinkSpec

logger = logging.getLogger("vllm.otel_moe")

SPAN_PAYLOAD_BYTES = 1 << 20  # per-token bytes in one moe.step span; larger steps are chunked
EXPORT_BYTES = 3 << 20  # one export request, under the Collector's 4 MiB gRPC default
EXPORT_SPANS = 512
EXPORT_INTERVAL_S = 1.0  # pending spans wait at most this long, so live files stay fresh
MAX_OPEN_REQUESTS = 8192  # per-request tallies kept at once; the oldest is emitted beyond
MAX_STEP_LINKS = 64  # a moe.step links to (at most this many of) the sampled requests that begin in it
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def traces_enabled(env=os.environ) -> bool:
    """OTEL_TRACES_EXPORTER=none: no spans at all (the metrics alone, say for a Prometheus scrape)."""
    return env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "none"


class _PresetIds(RandomIdGenerator):
    """Random ids, unless the next span's were fixed in advance: a request whose trace
    the front end started has its ``moe.request`` span's ids in its traceparent."""

    def __init__(self) -> None:
        self.trace_id: Optional[int] = None
        self.span_id: Optional[int] = None

    def generate_trace_id(self) -> int:
        preset, self.trace_id = self.trace_id, None
        return preset or super().generate_trace_id()

    def generate_span_id(self) -> int:
        preset, self.span_id = self.span_id, None
        return preset or super().generate_span_id()


class _Pending(SpanProcessor):
    """Ended ``moe.request`` spans, each sized once, wait here for the sink's next
    export. They end on the sink's own thread: no lock."""

    def __init__(self) -> None:
        self.spans: list[tuple[ReadableSpan, int]] = []
        self.bytes = 0

    def on_end(self, span: ReadableSpan) -> None:
        size = payload_bytes(span)
        self.spans.append((span, size))
        self.bytes += size

    def take(self) -> list[tuple[ReadableSpan, int]]:
        spans, self.spans, self.bytes = self.spans, [], 0
        return spans


class RequestTallies:
    """Per-request totals in arrays indexed by a slot per open request, so a step
    with hundreds of requests costs a few vectorised operations, not a loop."""

    def __init__(self, capacity: int = 64) -> None:
        self.slot_of: dict[str, int] = {}  # insertion order = age
        self.free: list[int] = []
        self.layers: list = []
        self.prefill = np.zeros(0, np.int64)
        self.decode = np.zeros(0, np.int64)
        self.start_ns = np.zeros(0, np.int64)
        self.end_ns = np.zeros(0, np.int64)
        self.counts: Optional[np.ndarray] = None  # [slots, L, E]
        self.first_span: dict[int, Any] = {}  # slot -> the context of its first moe.step span
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        old = len(self.prefill)
        pad = capacity - old
        self.prefill, self.decode, self.start_ns, self.end_ns = (
            np.pad(a, (0, pad)) for a in (self.prefill, self.decode, self.start_ns, self.end_ns))
        if self.counts is not None:
            self.counts = np.pad(self.counts, ((0, pad), (0, 0), (0, 0)))
        self.free.extend(range(capacity - 1, old - 1, -1))

    def slots(self, request_ids: list[str], start_ns: int, layers: list, num_experts: int) -> np.ndarray:
        if self.counts is None or self.layers != layers or self.counts.shape[2] != num_experts:
            self._relayer(layers, num_experts)
        out = np.empty(len(request_ids), np.int64)
        for i, request_id in enumerate(request_ids):
            slot = self.slot_of.get(request_id)
            if slot is None:
                if not self.free:
                    self._grow(2 * len(self.prefill))
                slot = self.slot_of[request_id] = self.free.pop()
                self.prefill[slot] = self.decode[slot] = 0
                self.counts[slot] = 0
                self.start_ns[slot] = start_ns
            out[i] = slot
        return out

    def _relayer(self, layers: list, num_experts: int) -> None:
        """Live control switched layers: keep the totals of layers still recorded."""
        counts = np.zeros((len(self.prefill), len(layers), num_experts), np.int64)
        if self.counts is not None and self.counts.shape[2] == num_experts:
            for column, layer in enumerate(layers):
                if layer in self.layers:
                    counts[:, column] = self.counts[:, self.layers.index(layer)]
        self.counts, self.layers = counts, list(layers)

    def pop(self, request_id: str) -> Optional[dict]:
        slot = self.slot_of.pop(request_id, None)
        if slot is None:
            return None
        self.free.append(slot)
        return {"prefill": int(self.prefill[slot]), "decode": int(self.decode[slot]),
                "start_ns": int(self.start_ns[slot]), "end_ns": int(self.end_ns[slot]),
                "counts": self.counts[slot].copy(), "link": self.first_span.pop(slot, None)}


def payload_bytes(span: ReadableSpan) -> int:
    """A cheap upper estimate of an SDK span's encoded size (never walks list elements)."""
    size = 256 + 80 * len(span.links)
    for value in (span.attributes or {}).values():
        if isinstance(value, (bytes, str)):
            size += 56 + len(value)
        else:
            size += 48 + (len(value) * 40 if isinstance(value, (tuple, list)) else 0)
    for event in span.events:
        size += 64
        for value in (event.attributes or {}).values():
            size += 16 + (len(value) + 8 if isinstance(value, (bytes, str)) else 16)
            if isinstance(value, (tuple, list)):
                size += 11 * len(value)
    return size


class OtlpSink:
    def __init__(self, spec: SinkSpec, resource_attributes: dict, transport: Optional[Transport] = None) -> None:
        self.mode = spec.mode  # of the latest step (live control may switch it)
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "vllm", **resource_attributes})
        self._pending = _Pending()
        self._ids = _PresetIds()
        # Sampling is decided per request (RequestTrace.sampled), once, before its tokens
        # are written: the provider records what it is given.
        self._provider = TracerProvider(
            sampler=ALWAYS_ON,
            id_generator=self._ids,
            resource=resource,
            span_limits=SpanLimits(
                max_span_attributes=128, max_events=4096, max_event_attributes=16,
                max_links=MAX_STEP_LINKS, max_attribute_length=None,
            ),
        )
        self._provider.add_span_processor(self._pending)
        from importlib.metadata import version

        self.tracer = self._provider.get_tracer(schema.INSTRUMENTATION_SCOPE, version("otel-moe"))
        self.traces_on = transport is not None or traces_enabled()
        self.transport = transport or (make_transport() if self.traces_on else None)
        # moe.step spans, encoded here: the request's heads are made once
        self._resource_head = pb.resource(dict(resource.attributes))
        self._scope_head = pb.scope_spans_head(schema.INSTRUMENTATION_SCOPE, version("otel-moe"))
        self._ids_key, self._weights_key = pb.key_field(schema.EXPERT_IDS), pb.key_field(schema.EXPERT_WEIGHTS)
        self._layers_encoded: tuple = (None, b"")  # (layers, their AnyValue)
        self._constant_attributes: dict = {}  # (key, value) -> an event's attribute field, for values few and repeated
        self._steps: list[bytes] = []  # encoded moe.step spans awaiting export
        self._steps_bytes = 0
        self.requests = RequestTallies()
        self.sampler = trace_context.sampler_from_env()
        self.traces: dict[str, trace_context.RequestTrace] = {}  # external id -> its trace, while live
        self.unsampled: set[str] = set()  # live requests whose routing is not sampled
        self.model = resource_attributes.get("vllm.model")
        self.metrics = open_metrics(resource_attributes, spec.metrics) if transport is None else None
        self.failed_export_spans = 0
        self.evicted_requests = 0
        self._last_export = time.monotonic()

    # ---- requests' traces -------------------------------------------------
    def begin(self, requests: list[tuple[str, str, str, int]]) -> None:
        if not self.traces_on:
            return
        for request_id, traceparent, tracestate, arrival_ns in requests:
            trace = trace_context.request_trace(traceparent, tracestate, arrival_ns, self.sampler, schema.REQUEST_SPAN)
            self.traces[request_id] = trace
            if not trace.sampled:
                self.unsampled.add(request_id)
        while len(self.traces) > 2 * MAX_OPEN_REQUESTS:  # requests never reported finished
            forgotten = next(iter(self.traces))
            del self.traces[forgotten]
            self.unsampled.discard(forgotten)

    def _sampled_only(self, record: StepRecord) -> tuple[StepRecord, int]:
        """The record less the tokens of unsampled requests; and how many tokens that left out."""
        if not self.unsampled or not record.request_ids:
            return record, 0
        keep = np.fromiter((r not in self.unsampled for r in record.request_ids), bool, len(record.request_ids))
        if keep.all():
            return record, 0
        rows = np.repeat(keep, record.request_tokens)
        return dataclasses.replace(
            record, request_ids=[r for r, k in zip(record.request_ids, keep.tolist()) if k],
            request_tokens=record.request_tokens[keep], positions=record.positions[rows], prompt_lens=record.prompt_lens[keep],
            ids=None if record.ids is None else record.ids[rows],
            weights=None if record.weights is None else record.weights[rows]), int(record.request_tokens[~keep].sum())

    # ---- steps ----------------------------------------------------------
    def write(self, record: StepRecord) -> None:
        """A tokens-mode step, a counts-mode step's layout (no ids, no counts: request
        totals only) or a counts-mode window (counts, no requests)."""
        self.mode = "counts" if record.ids is None else "tokens"
        if self.metrics is not None:
            self.metrics.add(record)  # every token, sampled or not
        if not self.traces_on:
            return
        record, unsampled_tokens = self._sampled_only(record)
        slots = self._tally(record) if record.request_ids else np.zeros(0, np.int64)
        if record.ids is not None or record.counts is not None:
            # A step and the requests that begin in it link each other: a step links to their
            # moe.request spans (ids fixed in advance), each of those to the step.
            first_span = self.requests.first_span
            beginning = [(slot, request_id) for slot, request_id in zip(slots.tolist(), record.request_ids)
                         if slot not in first_span]
            links = [pb.link(trace.trace_id, trace.span_id) for _, request_id in beginning[:MAX_STEP_LINKS]
                     if (trace := self.traces.get(request_id)) is not None]
            first = self._step_spans(record, unsampled_tokens, links)
            for slot, _ in beginning:
                first_span[slot] = first
        if (self._pending.bytes + self._steps_bytes >= EXPORT_BYTES
                or len(self._pending.spans) + len(self._steps) >= EXPORT_SPANS
                or time.monotonic() - self._last_export >= EXPORT_INTERVAL_S):
            self._export()

    def _common_attributes(self, record: StepRecord) -> dict:
        return {
            schema.SCHEMA: schema.SCHEMA_VERSION,
            schema.STEP_INDEX: record.step,
            schema.MODE: self.mode,
            schema.LAYERS: self._layers_value(record.layers),
            schema.TOP_K: record.top_k,
            schema.NUM_EXPERTS: record.num_experts,
            schema.DP_RANK: record.dp_rank,
            schema.DROPPED_STEPS: record.dropped_steps,
            schema.DROPPED_TOKENS: record.dropped_tokens,
            schema.FAILED_EXPORT_SPANS: self.failed_export_spans,
            schema.CONTROL_VERSION: record.control_version,
            schema.ENGINE_THREAD_NS: record.engine_thread_ns,
            **({schema.STEP_LAST_INDEX: record.last_step} if record.is_window else {}),
        }

    def _layers_value(self, layers: list) -> pb.EncodedValue:
        """The step's layers, encoded once while they stay the same (live control may switch them)."""
        if self._layers_encoded[0] != layers:
            self._layers_encoded = (list(layers), pb.EncodedValue(pb.any_value(list(layers))))
        return self._layers_encoded[1]

    def _step_spans(self, record: StepRecord, unsampled_tokens: int = 0, links: list = ()) -> SpanContext:
        """The step's spans, encoded and pending; returns the first one's context."""
        common = self._common_attributes(record)
        if unsampled_tokens:  # on the step's first span only: readers sum them over spans
            common[schema.STEP_UNSAMPLED_TOKENS] = unsampled_tokens
        if record.ids is None:  # counts mode: one small span per window of steps
            counts = record.layer_counts()
            head = pb.event_head(schema.ROUTING_EVENT, record.end_ns)
            events = [head + pb.attributes(3, {schema.LAYER: layer, schema.EXPERT_COUNTS: schema.encode_u32(counts[c])})
                      for c, layer in enumerate(record.layers)]
            return self._emit_step(record, common, 0, record.num_tokens, 0, 1, events, links)
        per_token = len(record.layers) * record.top_k * (schema.ids_dtype(record.num_experts).itemsize
                                                         + np.dtype(schema.WEIGHTS_DTYPE).itemsize)
        chunk_tokens = max(1, SPAN_PAYLOAD_BYTES // per_token)
        n = record.num_tokens
        chunks = max(1, -(-n // chunk_tokens))
        # Layer-major once for the step, in the wire's dtypes: each layer's bytes are then one
        # contiguous slice (a [tokens, layers, top_k] record would need a gather per layer).
        by_layer_ids = np.ascontiguousarray(record.ids.transpose(1, 0, 2), dtype=schema.ids_dtype(record.num_experts))
        by_layer_weights = np.ascontiguousarray(record.weights.transpose(1, 0, 2), dtype=schema.WEIGHTS_DTYPE)
        head = pb.event_head(schema.ROUTING_EVENT, record.end_ns)
        ids_dtype = self._constant(schema.EXPERT_IDS_DTYPE, by_layer_ids.dtype.str)
        weights_dtype = self._constant(schema.EXPERT_WEIGHTS_DTYPE, by_layer_weights.dtype.str)
        first = None
        for chunk in range(chunks):
            lo, hi = chunk * chunk_tokens, min(n, (chunk + 1) * chunk_tokens)
            events = [b"".join((head, self._constant(schema.LAYER, layer),
                                pb.bytes_attribute(3, self._ids_key, by_layer_ids[column, lo:hi].tobytes()), ids_dtype,
                                pb.bytes_attribute(3, self._weights_key, by_layer_weights[column, lo:hi].tobytes()),
                                weights_dtype))
                      for column, layer in enumerate(record.layers)]
            context = self._emit_step(record, common, lo, hi, chunk, chunks, events, links if chunk == 0 else ())
            first = first or context
            common.pop(schema.STEP_UNSAMPLED_TOKENS, None)
        return first

    def _constant(self, key: str, value) -> bytes:
        """An event attribute whose values are few (a layer, a dtype), encoded once."""
        field = self._constant_attributes.get((key, value))
        if field is None:
            field = self._constant_attributes[(key, value)] = pb.attributes(3, {key: value})
        return field

    def _emit_step(self, record: StepRecord, common: dict, lo: int, hi: int, chunk: int, chunks: int,
                   events: list[bytes], links: list[bytes] = ()) -> SpanContext:
        request_of = record.token_request_index()[lo:hi]
        present, first_index, tokens = np.unique(request_of, return_index=True, return_counts=True)
        order = np.argsort(first_index)  # keep batch order
        present, first_index, tokens = present[order], first_index[order], tokens[order]
        attributes = dict(common)
        attributes.update({
            schema.STEP_CHUNK: chunk,
            schema.STEP_CHUNKS: chunks,
            schema.NUM_TOKENS: hi - lo,
            schema.NUM_REQUESTS: len(present),
            schema.REQUEST_IDS: schema.encode_request_ids([record.request_ids[r] for r in present]),
            schema.REQUEST_TOKENS: schema.encode_u32(tokens),
            schema.REQUEST_FIRST_POSITIONS: schema.encode_u32(record.positions[lo + first_index]),
            schema.REQUEST_PROMPT_LENS: schema.encode_u32(record.prompt_lens[present]),
        })
        trace_id, span_id = self._ids.generate_trace_id(), self._ids.generate_span_id()
        span = pb.span(trace_id, span_id, schema.STEP_SPAN, record.start_ns, record.end_ns, attributes, events, links)
        self._steps.append(span)
        self._steps_bytes += len(span)
        return SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED)

    # ---- requests -------------------------------------------------------
    def _tally(self, record: StepRecord) -> np.ndarray:
        """Add the step to its requests' totals; returns their slots."""
        while len(self.requests.slot_of) + len(record.request_ids) > MAX_OPEN_REQUESTS:
            self.evicted_requests += 1
            oldest = next(iter(self.requests.slot_of))
            self._emit_request(oldest, self.requests.pop(oldest), incomplete=True)
            self.traces.pop(oldest, None)  # its span is out: a later part goes into a trace of its own
        t = self.requests
        slots = t.slots(record.request_ids, record.start_ns, record.layers, record.num_experts)
        request_of = record.token_request_index()
        prefill = np.bincount(request_of, weights=record.is_prefill(), minlength=len(slots)).astype(np.int64)
        t.prefill[slots] += prefill
        t.decode[slots] += record.request_tokens - prefill
        t.end_ns[slots] = record.end_ns
        if record.ids is not None:
            # one scatter-add of every (request, layer, expert) hit, straight into the totals
            num_layers, num_experts = len(record.layers), record.num_experts
            key = ((slots[request_of][:, None, None] * num_layers + np.arange(num_layers)[None, :, None])
                   * num_experts + record.ids)
            np.add.at(t.counts.reshape(-1), key.ravel(), 1)
        return slots

    def finish(self, request_ids: list[str], partial: set[str] = frozenset()) -> None:
        if not self.traces_on:
            return
        for request_id in request_ids:
            tally = self.requests.pop(request_id)
            if tally is not None:
                self._emit_request(request_id, tally, partial=request_id in partial)
            self.traces.pop(request_id, None)
            self.unsampled.discard(request_id)

    def _emit_request(self, request_id: str, tally: dict, incomplete: bool = False, partial: bool = False) -> None:
        attributes = {
            schema.SCHEMA: schema.SCHEMA_VERSION,
            schema.REQUEST_ID: request_id,
            schema.PREFILL_TOKENS: tally["prefill"],
            schema.DECODE_TOKENS: tally["decode"],
            schema.MODE: self.mode,
        }
        if self.mode == "tokens":
            attributes[schema.LAYERS] = list(self.requests.layers)
            attributes[schema.NUM_EXPERTS] = tally["counts"].shape[1]
            counts, dtype = schema.encode_counts(tally["counts"])
            attributes[schema.REQUEST_EXPERT_COUNTS] = counts
            attributes[schema.REQUEST_EXPERT_COUNTS_DTYPE] = dtype
        if incomplete:
            attributes[schema.REQUEST_INCOMPLETE] = True
        if partial:
            attributes[schema.REQUEST_PARTIAL] = True
        if self.model:
            attributes[schema.GEN_AI_REQUEST_MODEL] = self.model
        links = [Link(tally["link"])] if tally["link"] is not None else []
        start_ns, context = tally["start_ns"], None
        trace = self.traces.get(request_id)
        if trace is not None:
            context = trace.parent_context()
            self._ids.span_id = trace.span_id  # what the steps that link to it know it by
            if trace.parent is None:  # the trace's root: its trace id is its own
                self._ids.trace_id = trace.trace_id
            if trace.start_ns:  # from the request's arrival, as vLLM's llm_request, its child
                start_ns = min(start_ns, trace.start_ns)
        span = self.tracer.start_span(schema.REQUEST_SPAN, context=context, start_time=start_ns, attributes=attributes,
                                      links=links)
        self._ids.trace_id = self._ids.span_id = None
        span.end(end_time=tally["end_ns"])

    # ---- export ---------------------------------------------------------
    def idle(self) -> None:
        if self._pending.spans or self._steps:
            self._export()

    def _export(self) -> None:
        self._last_export = time.monotonic()
        steps, self._steps, self._steps_bytes = self._steps, [], 0
        for batch in _batches([(span, len(span)) for span in steps]):
            self._send(lambda: pb.export_request(self._resource_head, self._scope_head, batch), len(batch))
        for batch in _batches(self._pending.take()):
            self._send(lambda: encode_spans(batch).SerializeToString(), len(batch))

    def _send(self, encode, spans: int) -> None:
        try:
            ok = self.transport.send(encode(), spans)
        except Exception:
            ok = False
        if not ok:
            self.failed_export_spans += spans
            logger.warning("otel-moe: OTLP export of %d spans failed (%d so far)", spans, self.failed_export_spans)

    def close(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        if self.traces_on:
            for request_id in list(self.requests.slot_of):
                self._emit_request(request_id, self.requests.pop(request_id))
            if time.monotonic() < deadline:
                self._export()
            try:
                self.transport.shutdown()
            except Exception:
                pass
        if self.metrics is not None:
            try:
                self.metrics.close(max(0.5, deadline - time.monotonic()))  # a last export of the totals
            except Exception:
                logger.warning("otel-moe: the last metrics export failed")


def _batches(sized_spans: list[tuple[Any, int]]) -> list[list]:
    """Cut spans into export requests of at most EXPORT_BYTES / EXPORT_SPANS."""
    batches, batch, size = [], [], 0
    for span, span_size in sized_spans:
        if batch and (size + span_size > EXPORT_BYTES or len(batch) >= EXPORT_SPANS):
            batches.append(batch)
            batch, size = [], 0
        batch.append(span)
        size += span_size
    if batch:
        batches.append(batch)
    return batches

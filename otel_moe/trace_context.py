"""A request's W3C trace context, and whether its routing is sampled.

Every request gets a trace context in vLLM's front end (``frontend/binding.py``),
before vLLM's own tracing reads it: the client's ``traceparent`` when it sent one
(vLLM passes it on only with ``--otlp-traces-endpoint``), else one made here, as a
server instrumentation would make one. A context made here says so in its
``tracestate`` (``otelmoe=root``): its span id is then the request's ``moe.request``
span's own, the trace's root, and vLLM's ``llm_request`` its child.

The decision to sample is OpenTelemetry's: the sampler named by
``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (``parentbased_always_on`` by
default), asked once per request: in the front end for a context made here (its
``traceparent``'s sampled flag carries the answer on), in the exporter for a
client's (as the child of the client's span).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState, set_span_in_context

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
STATE_KEY, ROOT = "otelmoe", "root"  # tracestate otelmoe=root: the context was made by otel-moe
_ids = RandomIdGenerator()


def sampler_from_env() -> sampling.Sampler:
    """The sampler the OpenTelemetry SDK would make from the standard variables."""
    return sampling._get_from_env_or_default()


class RequestTrace(NamedTuple):
    """Where a request's ``moe.request`` span goes."""

    trace_id: int
    parent: Optional[SpanContext]  # the client's span; None: the request's span is the trace's root
    span_id: int  # the request span's own id, fixed in advance: steps link to it before it ends
    sampled: bool
    start_ns: int  # when the request arrived (0: unknown; the span starts at its first step)

    def parent_context(self):
        return set_span_in_context(NonRecordingSpan(self.parent)) if self.parent is not None else None

    def span_context(self) -> SpanContext:
        """The request span's, known before the span is made."""
        return SpanContext(self.trace_id, self.span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def new_root_headers(sampler: sampling.Sampler, name: str) -> dict[str, str]:
    """A trace context for a request that came without one, sampled or not by ``sampler``."""
    trace_id, span_id = _ids.generate_trace_id(), _ids.generate_span_id()
    sampled = sampler.should_sample(None, trace_id, name).decision.is_sampled()
    return {TRACEPARENT: f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}", TRACESTATE: f"{STATE_KEY}={ROOT}"}


def has_traceparent(headers) -> bool:
    return bool(headers) and parse_traceparent(headers.get(TRACEPARENT, "")) is not None


def parse_traceparent(value: str) -> Optional[tuple[int, int, int]]:
    """(trace id, span id, flags) of a W3C traceparent, or None when it is not one."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    if parts[0] == "00" and len(parts) != 4:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, flags


def request_trace(traceparent: str, tracestate: str, arrival_ns: int, sampler: sampling.Sampler, name: str) -> RequestTrace:
    """Where a request's span goes and whether it is sampled, from what the front end
    handed the engine (empty strings: nothing; the exporter then starts a trace)."""
    parsed = parse_traceparent(traceparent) if traceparent else None
    if parsed is None:  # no front end of otel-moe's saw the request: a root here
        trace_id = _ids.generate_trace_id()
        sampled = sampler.should_sample(None, trace_id, name).decision.is_sampled()
        return RequestTrace(trace_id, None, _ids.generate_span_id(), sampled, 0)
    trace_id, span_id, flags = parsed
    state = TraceState.from_header([tracestate]) if tracestate else TraceState()
    if state.get(STATE_KEY) == ROOT:  # made by otel-moe's front end, which sampled it
        return RequestTrace(trace_id, None, span_id, bool(flags & TraceFlags.SAMPLED), arrival_ns)
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0xFF), trace_state=state)
    sampled = sampler.should_sample(set_span_in_context(NonRecordingSpan(parent)), trace_id, name).decision.is_sampled()
    return RequestTrace(trace_id, parent, _ids.generate_span_id(), sampled, 0)

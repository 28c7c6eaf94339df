"""Where step records go. A sink turns ``StepRecord``s into output; it runs in
the worker's exporter process only, never in vLLM's."""
from __future__ import annotations

import dataclasses
from typing import Protocol

from otel_moe.config import DEFAULT_METRICS, DISCARD, OTLP
from otel_moe.exporter.records import StepRecord


@dataclasses.dataclass(frozen=True)
class SinkSpec:
    """What the sinks need to know: all the exporter process is told of the flags
    (``otel_moe.config.Config`` has these three fields too, and serves as one)."""

    destinations: tuple  # JSONL paths, "otlp", "discard"
    mode: str = "tokens"  # the mode recording starts in (live control may switch it)
    metrics: str = DEFAULT_METRICS  # VLLM_LOG_MOE_METRICS


class Sink(Protocol):
    def begin(self, requests: list[tuple[str, str, str, int]]) -> None:
        """Requests scheduled anew: (external id, traceparent, tracestate, arrival time
        in ns), the trace context vLLM's front end gave each ("" and 0: none)."""

    def write(self, record: StepRecord) -> None: ...

    def finish(self, request_ids: list[str], partial: set[str] = frozenset()) -> None:
        """vLLM reported these requests (external ids) finished; ``partial`` of them
        were recorded only in part (live control changed while they ran)."""

    def idle(self) -> None:
        """No step arrived for a while: export what is pending."""

    def close(self, timeout_s: float) -> None:
        """Flush what is pending, waiting at most ``timeout_s``."""


def open_sinks(spec: SinkSpec, resource_attributes: dict) -> Sink:
    sinks: list[Sink] = []
    for destination in spec.destinations:
        if destination == OTLP:
            from otel_moe.exporter.sinks.otlp import OtlpSink

            sinks.append(OtlpSink(spec, resource_attributes))
        elif destination == DISCARD:
            sinks.append(Discard())
        else:
            from otel_moe.exporter.sinks.jsonl import JsonlSink

            sinks.append(JsonlSink(destination))
    return sinks[0] if len(sinks) == 1 else Tee(sinks)


class Discard:
    """VLLM_LOG_MOE=discard: every step is read from the ring, laid out and acknowledged
    as usual, and its record goes nowhere (what otel-moe costs vLLM's process without
    any sink's work: no spans, metrics, files or collector)."""

    def begin(self, requests: list[tuple[str, str, str, int]]) -> None:
        pass

    def write(self, record: StepRecord) -> None:
        pass

    def finish(self, request_ids: list[str], partial: set[str] = frozenset()) -> None:
        pass

    def idle(self) -> None:
        pass

    def close(self, timeout_s: float) -> None:
        pass


class Tee:
    """Several sinks fed the same records (VLLM_LOG_MOE=otlp,/path.jsonl)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def begin(self, requests: list[tuple[str, str, str, int]]) -> None:
        self._each(lambda s: s.begin(requests))

    def write(self, record: StepRecord) -> None:
        self._each(lambda s: s.write(record))

    def finish(self, request_ids: list[str], partial: set[str] = frozenset()) -> None:
        self._each(lambda s: s.finish(request_ids, partial))

    def idle(self) -> None:
        self._each(lambda s: s.idle())

    def close(self, timeout_s: float) -> None:
        self._each(lambda s: s.close(timeout_s))

    def _each(self, call) -> None:
        # One failing sink must not starve the others; the first error is re-raised.
        error = None
        for sink in self.sinks:
            try:
                call(sink)
            except Exception as err:
                error = error or err
        if error is not None:
            raise error

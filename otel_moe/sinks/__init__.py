"""Where step records go. A sink turns ``StepRecord``s into output; it runs in
the worker's exporter process only, never in vLLM's."""
from __future__ import annotations

from typing import Protocol

from otel_moe.config import DISCARD, OTLP, Config
from otel_moe.step import StepRecord


class Sink(Protocol):
    def write(self, record: StepRecord) -> None: ...

    def finish(self, request_ids: list[str], partial: set[str] = frozenset()) -> None:
        """vLLM reported these requests (external ids) finished; ``partial`` of them
        were recorded only in part (live control changed while they ran)."""

    def idle(self) -> None:
        """No step arrived for a while: export what is pending."""

    def close(self, timeout_s: float) -> None:
        """Flush what is pending, waiting at most ``timeout_s``."""


def open_sinks(config: Config, resource_attributes: dict) -> Sink:
    sinks: list[Sink] = []
    for destination in config.destinations:
        if destination == OTLP:
            from otel_moe.sinks.otlp import OtlpSink

            sinks.append(OtlpSink(config, resource_attributes))
        elif destination == DISCARD:
            sinks.append(Discard())
        else:
            from otel_moe.sinks.jsonl import JsonlSink

            sinks.append(JsonlSink(destination))
    return sinks[0] if len(sinks) == 1 else Tee(sinks)


class Discard:
    """VLLM_LOG_MOE=discard: every step is read from the ring, laid out and acknowledged
    as usual, and its record goes nowhere (what otel-moe costs vLLM's process without
    any sink's work: no spans, metrics, files or collector)."""

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

"""Where step records go. A sink turns ``StepRecord``s into output; it runs on
the recorder's background thread only, never on the engine's."""
from __future__ import annotations

from typing import Protocol

from otel_moe.config import Config
from otel_moe.step import StepRecord


class Sink(Protocol):
    def write(self, record: StepRecord) -> None: ...

    def close(self, timeout_s: float) -> None:
        """Flush what is pending, waiting at most ``timeout_s``."""


def open_sink(config: Config, resource_attributes: dict) -> Sink:
    if config.is_otlp:
        from otel_moe.sinks.otlp import OtlpSink

        return OtlpSink(config, resource_attributes)
    from otel_moe.sinks.jsonl import JsonlSink

    return JsonlSink(config.destination, config.mode)

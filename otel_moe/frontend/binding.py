"""Binding to vLLM's front end: every request leaves it with a W3C trace context.

Wraps the input processor's ``process_inputs``, which turns each request into the
``EngineCoreRequest`` that the front end's output processor (vLLM's ``llm_request``
span) and the engine core (the scheduler, then otel-moe's recorder) both read.
A request that carries no ``traceparent`` gets one made here (``trace_context``),
so its ``moe.request`` span and vLLM's ``llm_request`` share one trace.
"""
from __future__ import annotations

import logging
from typing import Callable

from otel_moe import schema, trace_context
from otel_moe.wrapping import wrap_methods

logger = logging.getLogger("vllm.otel_moe")

PROCESSOR_CLASSES = (("vllm.v1.engine.input_processor", "InputProcessor"),)  # vLLM 0.26 to 0.33


def install() -> int:
    """Wrap every input processor class this vLLM has; returns how many were wrapped.
    (A vLLM without one still records: the exporter then starts its requests' traces.)"""
    return sum(wrap_methods(m, c, (("process_inputs", _with_trace_context),)) for m, c in PROCESSOR_CLASSES)


def _with_trace_context(original: Callable) -> Callable:
    sampler = trace_context.sampler_from_env()

    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        try:
            if not trace_context.has_traceparent(request.trace_headers):
                headers = dict(request.trace_headers or {})
                headers.update(trace_context.new_root_headers(sampler, schema.REQUEST_SPAN))
                request.trace_headers = headers
        except Exception:  # telemetry never fails a request
            logger.debug("otel-moe: could not give request a trace context", exc_info=True)
        return request

    return process_inputs

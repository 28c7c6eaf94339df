"""Binding to vLLM's front end: every request leaves it with a W3C trace context.

Wraps the input processor's ``process_inputs``, which turns each request into the
``EngineCoreRequest`` that the front end's output processor (vLLM's ``llm_request``
span) and the engine core (the scheduler, then otel-moe's recorder) both read.
A request that carries no ``traceparent`` gets one made here (``trace_context``),
so its ``moe.request`` span and vLLM's ``llm_request`` share one trace.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable

from otel_moe import schema, trace_context

logger = logging.getLogger("vllm.otel_moe")

PROCESSOR_CLASSES = (("vllm.v1.engine.input_processor", "InputProcessor"),)  # vLLM 0.26 to 0.33
_WRAPPED = "_otel_moe_wrapped"


def install() -> int:
    """Wrap every input processor class this vLLM has; returns how many were wrapped."""
    # (a vLLM without one still records; its requests' traces are then started by the exporter)
    wrapped = 0
    for module_name, class_name in PROCESSOR_CLASSES:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except Exception as err:  # absent in this version
            logger.debug("otel-moe: %s.%s not available: %s", module_name, class_name, err)
            continue
        original = cls.__dict__.get("process_inputs")
        if original is None or getattr(original, _WRAPPED, False):
            continue
        patched = _with_trace_context(original)
        patched.__wrapped__ = original
        setattr(patched, _WRAPPED, True)
        cls.process_inputs = patched
        wrapped += 1
    return wrapped


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

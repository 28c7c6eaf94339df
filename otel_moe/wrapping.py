"""Wrapping a class's methods in place, by module and class name, once: what both
bindings (the front end's and the worker's) do to the vLLM classes they find."""
from __future__ import annotations

import importlib
import logging
from typing import Callable, Iterable

logger = logging.getLogger("vllm.otel_moe")
WRAPPED = "_otel_moe_wrapped"  # on a wrapper: installing twice wraps nothing again


def wrap_methods(module_name: str, class_name: str, methods: Iterable[tuple[str, Callable]]) -> int:
    """Replace each ``method`` the class defines itself with ``wrapper(original)``;
    returns how many were wrapped (0 when the class is absent in this version)."""
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as err:  # absent in this version or platform
        logger.debug("otel-moe: %s.%s not available: %s", module_name, class_name, err)
        return 0
    wrapped = 0
    for method, wrapper in methods:
        original = cls.__dict__.get(method)  # only what this class defines itself
        if original is not None and not getattr(original, WRAPPED, False):
            patched = wrapper(original)
            patched.__wrapped__ = original
            setattr(patched, WRAPPED, True)
            setattr(cls, method, patched)
            wrapped += 1
    return wrapped

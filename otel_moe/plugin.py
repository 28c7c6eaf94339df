"""vLLM general plugin entry point (``vllm.general_plugins``).

vLLM calls ``register()`` in every process it starts (frontend, engine core,
workers). With ``VLLM_LOG_MOE`` unset or empty it returns at once: no patch,
no heavy import.
"""
from __future__ import annotations

import logging
import os
import uuid

from otel_moe import config as flags

logger = logging.getLogger("vllm.otel_moe")
RUN_ID = "OTEL_MOE_RUN_ID"


def register() -> None:
    cfg = flags.from_env()
    if cfg is None:
        return
    if not cfg.is_otlp:
        _check_writable(cfg.destination)
    # The first process of a run names it; processes it spawns inherit the name.
    os.environ.setdefault(RUN_ID, uuid.uuid4().hex[:16])
    from otel_moe.binding import install

    install(cfg)


def _check_writable(path: str) -> None:
    from otel_moe.sinks.jsonl import open_append

    try:
        os.close(open_append(path))
    except OSError as err:
        raise flags.ConfigError(
            f"otel-moe: {flags.LOG_MOE}={path!r} cannot be opened for writing: {err.strerror or err}"
        ) from None

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
RUN_ID = flags.RUN_ID
RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"


def register() -> None:
    _declare_variables()
    cfg = flags.from_env()
    if cfg is None:
        return
    for path in cfg.jsonl_paths:
        _check_writable(path)
    if RUN_ID not in os.environ:
        # The first process of a run names it; the processes it spawns inherit
        # the name, and so do vLLM's own spans (llm_request...) through the
        # standard resource variable, so a report can keep runs apart.
        os.environ[RUN_ID] = uuid.uuid4().hex[:16]
        from otel_moe.schema import RUN_ID as RUN_ID_ATTRIBUTE

        extra = f"{RUN_ID_ATTRIBUTE}={os.environ[RUN_ID]}"
        previous = os.environ.get(RESOURCE_ATTRIBUTES, "").strip().strip(",")
        os.environ[RESOURCE_ATTRIBUTES] = f"{previous},{extra}" if previous else extra
    from otel_moe.frontend import binding as frontend
    from otel_moe.worker import binding as worker

    frontend.install()  # in the process requests come into: each gets a trace context
    worker.install()


def _declare_variables() -> None:
    """Tell vLLM which VLLM_* variables are otel-moe's: it warns of any it does not know
    ("Unknown vLLM environment variable detected"), and refuses them with
    --fail-on-environ-validation. vLLM loads plugins before it checks."""
    try:
        import vllm.envs as envs

        for name in flags.VARIABLES:
            envs.environment_variables.setdefault(name, lambda name=name: os.environ.get(name))
    except Exception:  # a vLLM without that table: the warning stays, nothing breaks
        logger.debug("otel-moe: could not declare its variables to vLLM", exc_info=True)


def _check_writable(path: str) -> None:
    from otel_moe.exporter.sinks.jsonl import open_append

    try:
        os.close(open_append(path))
    except OSError as err:
        raise flags.ConfigError(
            f"otel-moe: {flags.LOG_MOE}={path!r} cannot be opened for writing: {err.strerror or err}"
        ) from None

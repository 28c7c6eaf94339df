"""The otel-moe flags, read from the environment and checked once at start.

Every invalid value raises ``ConfigError`` naming the variable, the value and
what is allowed, so a typo stops the engine before it serves instead of
silently recording nothing.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

from otel_moe.layer_ranges import MAX_LAYER, SYNTAX, RangeError, format_ranges, parse_ranges  # noqa: F401 (re-exported)

LOG_MOE = "VLLM_LOG_MOE"
LOG_LAYER = "VLLM_LOG_LAYER"
LOG_MODE = "VLLM_LOG_MOE_MODE"
NUM_MOE_LAYERS = "VLLM_NUM_MOE_LAYERS"
QUEUE_STEPS = "VLLM_LOG_MOE_QUEUE_STEPS"
CONTROL = "VLLM_LOG_MOE_CONTROL"
RING_MB = "VLLM_LOG_MOE_RING_MB"
COUNTS_INTERVAL_MS = "VLLM_LOG_MOE_COUNTS_INTERVAL_MS"
METRICS = "VLLM_LOG_MOE_METRICS"  # OTLP metrics detail: "experts" (per expert and layer) or "layers" (per layer)
METRICS_DETAILS = ("experts", "layers")
DEFAULT_METRICS = METRICS_DETAILS[0]
RUN_ID = "OTEL_MOE_RUN_ID"  # one run of vLLM: set by the first process's plugin, inherited by the rest
VARIABLES = (LOG_MOE, LOG_LAYER, LOG_MODE, NUM_MOE_LAYERS, QUEUE_STEPS, CONTROL, RING_MB, COUNTS_INTERVAL_MS, METRICS)

OTLP = "otlp"
# Routing captured and handed to the exporter, whose records go nowhere: what otel-moe
# costs vLLM's process without any sink's work (no spans, metrics, files or collector).
DISCARD = "discard"
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
OTLP_PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
MODES = ("tokens", "counts")
DEFAULT_QUEUE_STEPS = 256
DEFAULT_RING_MB = 128
DEFAULT_COUNTS_INTERVAL_MS = 100


class ConfigError(ValueError):
    """A flag has a value otel-moe cannot use."""


def _refuse(var: str, value: str, allowed: str) -> ConfigError:
    return ConfigError(f"otel-moe: {var}={value!r} is invalid; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    """Which decoder layers (N of ``model.layers.N``) to record; ``None`` = all."""

    layers: Optional[frozenset[int]]
    text: str = "all"
    source: str = LOG_LAYER  # what errors name: the variable, or a control field

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerSelection) and self.layers == other.layers

    def __hash__(self) -> int:
        return hash(self.layers)

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def check_against(self, model_layers: set[int]) -> None:
        """Refuse layers the model does not have (``model_layers``: its MoE layers)."""
        if self.layers is None:
            return
        missing = sorted(self.layers - model_layers)
        if missing:
            have = format_ranges(sorted(model_layers)) or "none"
            raise _refuse(
                self.source,
                self.text,
                f"MoE layers of this model ({have}); the model has no MoE layer {missing}",
            )


LAYER_SYNTAX = SYNTAX


def parse_layers(text: str, source: str = LOG_LAYER) -> LayerSelection:
    """``source`` names the variable (or control field) in errors."""
    try:
        layers = parse_ranges(text)
    except RangeError as err:
        raise _refuse(source, text.strip(), str(err)) from None
    return LayerSelection(layers, text.strip() if layers is not None else "all", source)


@dataclasses.dataclass(frozen=True)
class Config:
    destinations: tuple[str, ...]  # JSONL paths and/or OTLP, or DISCARD alone
    layers: LayerSelection
    mode: str  # "tokens" | "counts"
    expected_moe_layers: Optional[int]  # VLLM_NUM_MOE_LAYERS, only checked
    queue_steps: int
    control_path: Optional[str] = None  # VLLM_LOG_MOE_CONTROL: live start/stop/switch
    ring_mb: int = DEFAULT_RING_MB  # shared memory between a worker and its exporter
    counts_interval_ms: int = DEFAULT_COUNTS_INTERVAL_MS  # counts mode: device counters read this often
    metrics: str = METRICS_DETAILS[0]  # with OTLP: what the expert-load metrics break down

    @property
    def jsonl_paths(self) -> list[str]:
        return [d for d in self.destinations if d not in (OTLP, DISCARD)]


def _positive_int(var: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise _refuse(var, text, "a positive integer")
    return value


def otlp_protocol(env: Mapping[str, str] = os.environ) -> str:
    """The OTLP protocol from the standard variables (the traces one wins)."""
    for var in OTLP_PROTOCOL_VARS:
        value = env.get(var, "").strip()
        if value:
            if value not in OTLP_PROTOCOLS:
                raise _refuse(var, value, " or ".join(OTLP_PROTOCOLS))
            return value
    return "grpc"


PROMETHEUS_PORT = "OTEL_EXPORTER_PROMETHEUS_PORT"


def _prometheus_port(env: Mapping[str, str]) -> None:
    """Checked at start, in vLLM's process, rather than failing the exporter later
    (the port it serves on is this plus the worker's data-parallel rank)."""
    text = env.get(PROMETHEUS_PORT, "").strip()
    if text and not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
        raise _refuse(PROMETHEUS_PORT, env[PROMETHEUS_PORT], "a TCP port, 1 to 65535")


def from_env(env: Mapping[str, str] = os.environ) -> Optional[Config]:
    """The configuration, or ``None`` when recording is off (VLLM_LOG_MOE unset or empty)."""
    text = env.get(LOG_MOE, "").strip()
    if not text:
        return None
    destinations = []
    for destination in (d.strip() for d in text.split(",")):
        if destination.lower() == OTLP:
            destination = OTLP
            otlp_protocol(env)
            _prometheus_port(env)
        elif destination.lower() == DISCARD:
            destination = DISCARD
        elif not destination or os.path.isdir(destination) or destination.endswith(os.sep):
            raise _refuse(LOG_MOE, text, f"a file path for JSONL output, '{OTLP}', or both separated by a comma; "
                                         f"or '{DISCARD}' alone")
        destinations.append(destination)
    if DISCARD in destinations and len(set(destinations)) > 1:
        raise _refuse(LOG_MOE, text, f"'{DISCARD}' alone (it records nothing), or file paths and '{OTLP}'")
    mode = env.get(LOG_MODE, "tokens").strip().lower() or "tokens"
    if mode not in MODES:
        raise _refuse(LOG_MODE, env[LOG_MODE], " or ".join(MODES))
    expected = env.get(NUM_MOE_LAYERS, "").strip()
    queue = env.get(QUEUE_STEPS, "").strip()
    ring_mb = env.get(RING_MB, "").strip()
    interval = env.get(COUNTS_INTERVAL_MS, "").strip()
    metrics = env.get(METRICS, "").strip().lower() or METRICS_DETAILS[0]
    if metrics not in METRICS_DETAILS:
        raise _refuse(METRICS, env[METRICS], " or ".join(METRICS_DETAILS))
    control = env.get(CONTROL, "").strip() or None
    if control is not None and (os.path.isdir(control) or not os.path.isdir(os.path.dirname(os.path.abspath(control)))):
        raise _refuse(CONTROL, control, "a file path in an existing directory (the file itself may be absent)")
    return Config(
        destinations=tuple(dict.fromkeys(destinations)),
        layers=parse_layers(env.get(LOG_LAYER, "")),
        mode=mode,
        expected_moe_layers=_positive_int(NUM_MOE_LAYERS, expected) if expected else None,
        queue_steps=_positive_int(QUEUE_STEPS, queue) if queue else DEFAULT_QUEUE_STEPS,
        control_path=control,
        ring_mb=_positive_int(RING_MB, ring_mb) if ring_mb else DEFAULT_RING_MB,
        counts_interval_ms=_positive_int(COUNTS_INTERVAL_MS, interval) if interval else DEFAULT_COUNTS_INTERVAL_MS,
        metrics=metrics,
    )

"""The otel-moe flags, read from the environment and checked once at start.

Every invalid value raises ``ConfigError`` naming the variable, the value and
what is allowed, so a typo stops the engine before it serves instead of
silently recording nothing.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

LOG_MOE = "VLLM_LOG_MOE"
LOG_LAYER = "VLLM_LOG_LAYER"
LOG_MODE = "VLLM_LOG_MOE_MODE"
NUM_MOE_LAYERS = "VLLM_NUM_MOE_LAYERS"
QUEUE_STEPS = "VLLM_LOG_MOE_QUEUE_STEPS"

OTLP = "otlp"
MODES = ("tokens", "counts")
DEFAULT_QUEUE_STEPS = 256


class ConfigError(ValueError):
    """A flag has a value otel-moe cannot use."""


def _refuse(var: str, value: str, allowed: str) -> ConfigError:
    return ConfigError(f"otel-moe: {var}={value!r} is invalid; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    """Which decoder layers (N of ``model.layers.N``) to record; ``None`` = all."""

    layers: Optional[frozenset[int]]
    text: str = "all"

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def check_against(self, model_layers: set[int]) -> None:
        """Refuse layers the model does not have (``model_layers``: its MoE layers)."""
        if self.layers is None:
            return
        missing = sorted(self.layers - model_layers)
        if missing:
            have = _ranges(sorted(model_layers)) or "none"
            raise _refuse(
                LOG_LAYER,
                self.text,
                f"MoE layers of this model ({have}); the model has no MoE layer {missing}",
            )


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


LAYER_SYNTAX = "'all', a layer index like 0, a list like 0,12,23, a range like 0-5, or a mix"


def parse_layers(text: str) -> LayerSelection:
    text = text.strip()
    if text == "" or text.lower() == "all":
        return LayerSelection(None, "all")
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise _refuse(LOG_LAYER, text, LAYER_SYNTAX) from None
        if first < 0 or last < first:
            raise _refuse(LOG_LAYER, text, LAYER_SYNTAX)
        layers.update(range(first, last + 1))
    return LayerSelection(frozenset(layers), text)


@dataclasses.dataclass(frozen=True)
class Config:
    destination: str  # a JSONL path, or OTLP
    layers: LayerSelection
    mode: str  # "tokens" | "counts"
    expected_moe_layers: Optional[int]  # VLLM_NUM_MOE_LAYERS, only checked
    queue_steps: int

    @property
    def is_otlp(self) -> bool:
        return self.destination == OTLP


def _positive_int(var: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise _refuse(var, text, "a positive integer")
    return value


def from_env(env: Mapping[str, str] = os.environ) -> Optional[Config]:
    """The configuration, or ``None`` when recording is off (VLLM_LOG_MOE unset or empty)."""
    destination = env.get(LOG_MOE, "").strip()
    if not destination:
        return None
    if destination.lower() == OTLP:
        destination = OTLP
    elif os.path.isdir(destination) or destination.endswith(os.sep):
        raise _refuse(LOG_MOE, destination, f"a file path for JSONL output, or '{OTLP}'")
    mode = env.get(LOG_MODE, "tokens").strip().lower() or "tokens"
    if mode not in MODES:
        raise _refuse(LOG_MODE, env[LOG_MODE], " or ".join(MODES))
    expected = env.get(NUM_MOE_LAYERS, "").strip()
    queue = env.get(QUEUE_STEPS, "").strip()
    return Config(
        destination=destination,
        layers=parse_layers(env.get(LOG_LAYER, "")),
        mode=mode,
        expected_moe_layers=_positive_int(NUM_MOE_LAYERS, expected) if expected else None,
        queue_steps=_positive_int(QUEUE_STEPS, queue) if queue else DEFAULT_QUEUE_STEPS,
    )

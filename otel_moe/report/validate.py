"""Checks on every record the report reads. A record that fails one is skipped
and counted under its reason; its neighbours are kept. Nothing here raises
anything but ``BadRecord``."""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from otel_moe.layer_ranges import MAX_LAYER
from otel_moe.schema import DECODE, PREFILL

MAX_EXPERTS = 4096  # real models have <= 384; a larger number is a corrupt record
MAX_TOP_K = 64
MAX_POSITION = 1 << 31


class BadRecord(ValueError):
    """``str(err)`` is the reason, the key it is counted under."""


def whole(value: Any, what: str, low: int = 0, high: Optional[int] = None) -> int:
    """An integer (not a bool, not a float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise BadRecord(f"{what} not an integer in range")
    return value


def seconds(value: Any, what: str) -> Optional[float]:
    """A latency: None, or a finite number >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadRecord(f"{what} not a finite number of seconds")
    return float(value)


def expert_ids(ids: np.ndarray, num_experts: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise BadRecord("expert id out of range")


def weights(values: np.ndarray) -> None:
    if values.size and not np.isfinite(values).all():
        raise BadRecord("expert weight not finite")


def num_experts(value: Any) -> int:
    return whole(value, "num_experts", 1, MAX_EXPERTS)


def top_k(value: Any) -> int:
    return whole(value, "top_k", 1, MAX_TOP_K)


def layer(value: Any) -> int:
    return whole(value, "layer", 0, MAX_LAYER)


def jsonl_row(row: dict) -> None:
    """One row of the JSONL sink: a token of one layer, or (counts mode) a step of one layer."""
    whole(row.get("step"), "step")
    layer(row.get("layer"))
    if "counts" in row:
        counts = row["counts"]
        if not isinstance(counts, list) or not 1 <= len(counts) <= MAX_EXPERTS:
            raise BadRecord("counts not a list of num_experts integers")
        for c in counts:
            whole(c, "count")
        whole(row.get("num_tokens"), "num_tokens")
        return
    if not isinstance(row.get("request_id"), str):
        raise BadRecord("request_id not a string")
    whole(row.get("position"), "position", 0, MAX_POSITION)
    if row.get("phase") not in (PREFILL, DECODE):
        raise BadRecord("phase neither prefill nor decode")
    ids, ws = row.get("expert_ids"), row.get("expert_weights")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_TOP_K:
        raise BadRecord("expert_ids not a list of top-k integers")
    limit = num_experts(row["num_experts"]) - 1 if row.get("num_experts") is not None else MAX_EXPERTS - 1
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= limit:
            raise BadRecord("expert id out of range")
    if not isinstance(ws, list) or len(ws) != len(ids):
        raise BadRecord("expert_weights not one number per expert id")
    for w in ws:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise BadRecord("expert weight not finite")

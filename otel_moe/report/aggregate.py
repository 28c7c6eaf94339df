"""Streaming aggregation: memory depends on layers, experts and requests,
never on the number of tokens or steps (time series are decimated)."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Optional

import numpy as np

MAX_SERIES_POINTS = 2048


class Series:
    """Per-step values kept at bounded size: when full, neighbours are averaged."""

    def __init__(self) -> None:
        self.x: list[float] = []
        self.y: list[float] = []
        self.width = 1  # steps per point
        self._acc: list[tuple[float, float]] = []

    def add(self, x: float, y: float) -> None:
        self._acc.append((x, y))
        if len(self._acc) == self.width:
            self.x.append(self._acc[0][0])
            self.y.append(sum(v for _, v in self._acc) / len(self._acc))
            self._acc = []
            if len(self.x) >= MAX_SERIES_POINTS:
                self.x = self.x[::2]
                self.y = [(a + b) / 2 for a, b in zip(self.y[::2], self.y[1::2] + self.y[-1:])]
                self.width *= 2


@dataclasses.dataclass
class LayerStats:
    num_experts: int
    counts: np.ndarray
    prefill: np.ndarray
    decode: np.ndarray
    tokens: int = 0
    top1_weight_sum: float = 0.0
    weight_sum: float = 0.0
    weighted_tokens: int = 0
    max_over_mean: Series = dataclasses.field(default_factory=Series)
    cv: Series = dataclasses.field(default_factory=Series)

    @classmethod
    def empty(cls, num_experts: int) -> "LayerStats":
        z = lambda: np.zeros(num_experts, dtype=np.int64)  # noqa: E731
        return cls(num_experts, z(), z(), z())

    def grow(self, num_experts: int) -> None:
        if num_experts > self.num_experts:
            pad = num_experts - self.num_experts
            self.counts, self.prefill, self.decode = (np.pad(a, (0, pad)) for a in (self.counts, self.prefill, self.decode))
            self.num_experts = num_experts


@dataclasses.dataclass
class RequestStats:
    tokens: int = 0
    prefill: int = 0
    decode: int = 0
    experts: Optional[np.ndarray] = None  # counts over all layers, for the usage spread
    e2e_s: Optional[float] = None
    ttft_s: Optional[float] = None
    queue_s: Optional[float] = None
    completion_tokens: Optional[int] = None


class RunStats:
    def __init__(self) -> None:
        self.layers: dict[int, LayerStats] = {}
        self.requests: dict[str, RequestStats] = defaultdict(RequestStats)
        self.steps = 0
        self.dropped_steps = 0
        self.top_k = 0
        self._step_key = None
        self._step_counts: dict[int, np.ndarray] = {}

    def layer(self, layer: int, num_experts: int) -> LayerStats:
        stats = self.layers.get(layer)
        if stats is None:
            stats = self.layers[layer] = LayerStats.empty(num_experts)
        stats.grow(num_experts)
        return stats

    # One step's routing for one layer. ids/weights: [n, K] (None in counts mode);
    # request_of: [n] request index into request_ids; prefill: [n] bool.
    def add_layer(self, step: int, layer: int, num_experts: int, counts: np.ndarray,
                  ids: Optional[np.ndarray], weights: Optional[np.ndarray],
                  request_ids: Optional[list], request_of: Optional[np.ndarray],
                  prefill: Optional[np.ndarray], num_tokens: int) -> None:
        stats = self.layer(layer, num_experts)
        stats.counts[: len(counts)] += counts
        stats.tokens += num_tokens
        if ids is not None:
            k = ids.shape[1]
            self.top_k = max(self.top_k, k)
            if prefill is not None:
                stats.prefill += np.bincount(ids[prefill].ravel(), minlength=stats.num_experts)[: stats.num_experts]
                stats.decode += np.bincount(ids[~prefill].ravel(), minlength=stats.num_experts)[: stats.num_experts]
            if weights is not None and len(weights):
                stats.top1_weight_sum += float(weights.max(axis=1).sum())
                stats.weight_sum += float(weights.sum())
                stats.weighted_tokens += len(weights)
            if request_of is not None and request_ids is not None:
                per_request = np.bincount(
                    (request_of[:, None] * stats.num_experts + ids).ravel(),
                    minlength=len(request_ids) * stats.num_experts,
                ).reshape(len(request_ids), stats.num_experts)
                for r, request_id in enumerate(request_ids):
                    mine = self.requests[request_id]
                    if mine.experts is None or len(mine.experts) < stats.num_experts:
                        old = mine.experts if mine.experts is not None else np.zeros(0, np.int64)
                        mine.experts = np.pad(old, (0, stats.num_experts - len(old)))
                    mine.experts[: stats.num_experts] += per_request[r]
        # Imbalance is per whole step: chunks of one step are summed first.
        if self._step_key != step:
            self.flush_step()
            self._step_key = step
            self.steps += 1
        acc = self._step_counts.get(layer)
        self._step_counts[layer] = counts.astype(np.int64) if acc is None else acc + counts

    def add_request_tokens(self, request_ids: list, request_tokens: np.ndarray, prefill_tokens: np.ndarray) -> None:
        for request_id, tokens, prefill in zip(request_ids, request_tokens.tolist(), prefill_tokens.tolist()):
            mine = self.requests[request_id]
            mine.tokens += tokens
            mine.prefill += prefill
            mine.decode += tokens - prefill

    def flush_step(self) -> None:
        for layer, counts in self._step_counts.items():
            mean = counts.mean()
            if mean > 0:
                stats = self.layers[layer]
                stats.max_over_mean.add(self._step_key, float(counts.max() / mean))
                stats.cv.add(self._step_key, float(counts.std() / mean))
        self._step_counts = {}


def entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())

"""Streaming aggregation: memory depends on layers, experts and requests,
never on the number of tokens or steps (time series are decimated)."""
from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from typing import Optional

import numpy as np

MAX_SERIES_POINTS = 2048
MAX_GRID_COLUMNS = 512
POSITION_BUCKETS = 21  # 0, 1, 2-3, 4-7, ..., 2^19 and beyond
WEIGHT_BINS_PER_UNIT = 100  # router confidence histograms: bins of 0.01 over [0, 4), the last takes the rest
WEIGHT_BIN = 1 / WEIGHT_BINS_PER_UNIT
WEIGHT_BINS = 4 * WEIGHT_BINS_PER_UNIT + 1
COOCCURRENCE_MAX_EXPERTS = 256  # an E x E matrix per layer; above this it is not kept
PAIR_BUFFER = 1 << 21  # pair indices (uint16) a layer holds before they are counted: 4 MiB
REQUEST_ROUTING_BUDGET = 512 << 20  # bytes for per-request, per-layer expert counts


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


class StepGrid:
    """Per step (counts mode: per window) its token count and each layer's
    max/mean load, at most MAX_GRID_COLUMNS columns: neighbours are merged
    (means) when full. Feeds the layer x step imbalance heatmap."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.tokens: list[float] = []
        self.values: list[dict[int, float]] = []
        self.width = 1
        self._acc: list[tuple[int, int, dict[int, float]]] = []

    def add(self, step: int, tokens: int, values: dict[int, float]) -> None:
        self._acc.append((step, tokens, values))
        if len(self._acc) < self.width:
            return
        self._push(self._acc)
        self._acc = []
        if len(self.steps) >= MAX_GRID_COLUMNS:
            old = list(zip(self.steps, self.tokens, self.values))
            self.steps, self.tokens, self.values = [], [], []
            for i in range(0, len(old), 2):
                self._push(old[i:i + 2])
            self.width *= 2

    def _push(self, group: list[tuple[int, float, dict[int, float]]]) -> None:
        merged: dict[int, list[float]] = defaultdict(list)
        for _, _, values in group:
            for layer, v in values.items():
                merged[layer].append(v)
        self.steps.append(group[0][0])
        self.tokens.append(sum(t for _, t, _ in group) / len(group))
        self.values.append({layer: sum(v) / len(v) for layer, v in merged.items()})

    def finish(self) -> None:
        if self._acc:
            self._push(self._acc)
            self._acc = []


@dataclasses.dataclass
class LayerStats:
    num_experts: int
    counts: np.ndarray  # [E]
    by_position: np.ndarray  # [2 (prefill, decode), POSITION_BUCKETS, E] (tokens mode)
    top1_hist: np.ndarray  # [WEIGHT_BINS]
    topk_sum_hist: np.ndarray
    cooccurrence: Optional[np.ndarray]  # [E, E], i < j in the upper triangle
    tokens: int = 0
    top1_weight_sum: float = 0.0
    weight_sum: float = 0.0
    weighted_tokens: int = 0
    max_over_mean: Series = dataclasses.field(default_factory=Series)
    cv: Series = dataclasses.field(default_factory=Series)
    _pairs: list = dataclasses.field(default_factory=list)
    _pairs_len: int = 0

    @classmethod
    def empty(cls, num_experts: int) -> "LayerStats":
        return cls(num_experts, np.zeros(num_experts, np.int64), np.zeros((2, POSITION_BUCKETS, num_experts), np.int64),
                   np.zeros(WEIGHT_BINS, np.int64), np.zeros(WEIGHT_BINS, np.int64),
                   np.zeros((num_experts, num_experts), np.int64) if num_experts <= COOCCURRENCE_MAX_EXPERTS else None)

    @property
    def prefill(self) -> np.ndarray:
        return self.by_position[0].sum(axis=0)

    @property
    def decode(self) -> np.ndarray:
        return self.by_position[1].sum(axis=0)

    def grow(self, num_experts: int) -> None:
        if num_experts <= self.num_experts:
            return
        self.flush_pairs()
        pad = num_experts - self.num_experts
        self.counts = np.pad(self.counts, (0, pad))
        self.by_position = np.pad(self.by_position, ((0, 0), (0, 0), (0, pad)))
        if self.cooccurrence is not None:
            self.cooccurrence = np.pad(self.cooccurrence, ((0, pad), (0, pad))) if num_experts <= COOCCURRENCE_MAX_EXPERTS else None
        self.num_experts = num_experts

    def add_tokens(self, ids: np.ndarray, weights: Optional[np.ndarray], position_rows: Optional[np.ndarray]) -> None:
        """ids, weights: [n, K]; position_rows: [n], each token's row of by_position (position_rows())."""
        e = self.num_experts
        if position_rows is not None:
            self.by_position += np.bincount((position_rows[:, None] * e + ids).ravel(),
                                            minlength=self.by_position.size).reshape(self.by_position.shape)
        if weights is not None and len(weights):
            # token-major [n, K] reduced along K is one short reduction per token; K rows of n
            # reduce as whole vectors (~7x faster at K = 4)
            by_rank = np.ascontiguousarray(weights.T, dtype=np.float32)
            top1, total = by_rank.max(axis=0), by_rank.sum(axis=0)
            self.top1_weight_sum += float(top1.sum())
            self.weight_sum += float(total.sum())
            self.weighted_tokens += len(weights)
            self.top1_hist += _weight_histogram(top1)
            self.topk_sum_hist += _weight_histogram(total)
        if self.cooccurrence is not None and ids.shape[1] > 1:
            a, b = _pairs_of(ids.shape[1])
            # Each pair of a token's ids as they come (x, y) -> x * e + y; flush_pairs folds
            # (x, y) and (y, x) together, so no min/max here. ids arrive as narrow as the wire
            # keeps them (uint8 up to 256 experts), where x * e would wrap: uint16 holds every
            # pair index of up to 256 experts (e * e <= 65536).
            pairs = ids[:, a].astype(np.uint16)
            pairs *= e
            np.add(pairs, ids[:, b], out=pairs, casting="unsafe")  # ids < e: JSONL's int64 ones too
            self.add_pairs(pairs.ravel())

    def add_pairs(self, pairs: np.ndarray) -> None:
        """Pair indices x * e + y of a step's tokens, counted when enough have come."""
        self._pairs.append(pairs)
        self._pairs_len += len(pairs)
        if self._pairs_len >= PAIR_BUFFER:
            self.flush_pairs()

    def flush_pairs(self) -> None:
        if self._pairs and self.cooccurrence is not None:
            e = self.num_experts
            ordered = np.bincount(np.concatenate(self._pairs), minlength=e * e).reshape(e, e)
            # {x, y} in the upper triangle (x < y); a token that repeats an id keeps it on the diagonal
            self.cooccurrence += np.triu(ordered + ordered.T, 1) + np.diag(np.diag(ordered))
        self._pairs, self._pairs_len = [], 0


@functools.lru_cache(maxsize=None)
def _pairs_of(k: int) -> tuple[np.ndarray, np.ndarray]:
    """The columns (a, b), a < b, of every pair of a token's k ids (np.triu_indices
    takes ~40 us, as long as a layer's whole step of counting at k = 4)."""
    return np.triu_indices(k, 1)


def position_rows(prefill: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Each token's row of LayerStats.by_position: its phase, then its position's
    power-of-two bucket."""
    bucket = np.minimum(np.frexp(positions.astype(np.float64))[1], POSITION_BUCKETS - 1)
    return (np.where(prefill, 0, POSITION_BUCKETS) + bucket).astype(np.int64)


def _weight_histograms(values: np.ndarray) -> np.ndarray:
    """_weight_histogram of each row of values [L, n] -> [L, WEIGHT_BINS]."""
    index = (values * np.float64(WEIGHT_BINS_PER_UNIT)).astype(np.int64)
    np.minimum(index, WEIGHT_BINS - 1, out=index)
    np.maximum(index, 0, out=index)
    index += np.arange(len(values))[:, None] * WEIGHT_BINS
    return np.bincount(index.ravel(), minlength=len(values) * WEIGHT_BINS).reshape(len(values), WEIGHT_BINS)


def _weight_histogram(values: np.ndarray) -> np.ndarray:
    # float64 whatever the input (a float64 scalar makes the product one), so a weight on a
    # bin's edge falls in the same bin however narrow the weights arrived
    index = (values * np.float64(WEIGHT_BINS_PER_UNIT)).astype(np.int64)
    np.minimum(index, WEIGHT_BINS - 1, out=index)
    np.maximum(index, 0, out=index)
    return np.bincount(index, minlength=WEIGHT_BINS)


@dataclasses.dataclass
class RequestStats:
    tokens: int = 0
    prefill: int = 0
    decode: int = 0
    row: Optional[int] = None  # into RequestRouting; -1: its per-layer routing is not kept
    e2e_s: Optional[float] = None
    ttft_s: Optional[float] = None
    queue_s: Optional[float] = None
    completion_tokens: Optional[int] = None
    trace_id: str = ""  # of vLLM's llm_request: where the request's spans are


class RequestRouting:
    """Per request, per layer, per expert: how many of its tokens went there.
    One array [requests, layers, experts] (uint32), grown by doubling, never
    past REQUEST_ROUTING_BUDGET bytes: requests beyond it are not kept (counted)."""

    def __init__(self, budget: int = REQUEST_ROUTING_BUDGET) -> None:
        self.budget = budget
        self.slots: dict[int, int] = {}  # layer -> axis-1 index
        self.counts = np.zeros((0, 0, 0), np.uint32)
        self.rows = 0
        self.not_kept = 0

    def new_row(self) -> int:
        if self.rows == len(self.counts):
            if not self._resize(max(16, 2 * self.rows), self.counts.shape[1], self.counts.shape[2]):
                self.not_kept += 1
                return -1
        self.rows += 1
        return self.rows - 1

    def slot(self, layer: int, num_experts: int) -> Optional[int]:
        if layer not in self.slots or num_experts > self.counts.shape[2]:
            layers = self.counts.shape[1] + (layer not in self.slots)
            if not self._resize(len(self.counts), layers, max(num_experts, self.counts.shape[2])):
                return None
            self.slots.setdefault(layer, layers - 1)
        return self.slots[layer]

    def _resize(self, rows: int, layers: int, experts: int) -> bool:
        if rows * layers * experts * 4 > self.budget:
            return False
        grown = np.zeros((rows, layers, experts), np.uint32)
        r, n, e = self.counts.shape
        grown[:r, :n, :e] = self.counts
        self.counts = grown
        return True

    def add(self, rows: np.ndarray, layer: int, num_experts: int, per_request: np.ndarray) -> None:
        """rows: [R] (-1: not kept), per_request: [R, E]."""
        slot = self.slot(layer, num_experts)
        keep = rows >= 0
        if slot is None or not keep.any():
            return
        self.counts[rows[keep], slot, : per_request.shape[1]] += per_request[keep].astype(np.uint32)

    def of(self, row: int) -> dict[int, np.ndarray]:
        return {layer: self.counts[row, slot] for layer, slot in sorted(self.slots.items())}


class RunStats:
    def __init__(self) -> None:
        self.layers: dict[int, LayerStats] = {}
        self.requests: dict[str, RequestStats] = defaultdict(RequestStats)
        self.routing = RequestRouting()
        self.grid = StepGrid()
        self.steps = 0  # steps, or windows of steps (counts mode), or metrics exports
        self.unsampled_tokens = 0  # tokens the traces leave out: their requests were not sampled
        self.modes: set[str] = set()  # "tokens": ids per token; "counts": counts per step or window
        self.top_k = 0
        self._step_key = None
        self._step_tokens = 0
        self._step_counts: dict[int, np.ndarray] = {}
        self._rows_of: tuple = (None, None)  # (a step's positions, their position_rows)

    def layer(self, layer: int, num_experts: int) -> LayerStats:
        stats = self.layers.get(layer)
        if stats is None:
            stats = self.layers[layer] = LayerStats.empty(num_experts)
        stats.grow(num_experts)
        return stats

    def begin_step(self, step: int, tokens: int) -> None:
        """Imbalance is per whole step: chunks of one step are summed first."""
        if self._step_key != step:
            self.flush_step()
            self._step_key = step
            self.steps += 1
            self._step_tokens = 0
        self._step_tokens += tokens

    # One step's routing for one layer. ids/weights: [n, K] (None in counts mode);
    # request_of: [n] index into the step's requests, request_rows: [R] their rows in
    # self.routing (request_rows()); prefill, positions: [n].
    def add_layer(self, layer: int, num_experts: int, counts: np.ndarray,
                  ids: Optional[np.ndarray], weights: Optional[np.ndarray],
                  request_rows: Optional[np.ndarray], request_of: Optional[np.ndarray],
                  prefill: Optional[np.ndarray], positions: Optional[np.ndarray], num_tokens: int) -> None:
        stats = self.layer(layer, num_experts)
        stats.counts[: len(counts)] += counts
        stats.tokens += num_tokens
        self.modes.add("counts" if ids is None else "tokens")
        if ids is not None:
            self.top_k = max(self.top_k, ids.shape[1])
            rows = None
            if prefill is not None and positions is not None:
                if self._rows_of[0] is not positions:  # a step's layers share its positions: once a step
                    self._rows_of = (positions, position_rows(prefill, positions))
                rows = self._rows_of[1]
            stats.add_tokens(ids, weights, rows)
            if request_of is not None and request_rows is not None and len(request_rows):
                e, r = stats.num_experts, len(request_rows)
                per_request = np.bincount((request_of[:, None] * e + ids).ravel(), minlength=r * e).reshape(r, e)
                self.routing.add(request_rows, layer, e, per_request)
        acc = self._step_counts.get(layer)
        self._step_counts[layer] = counts.astype(np.int64) if acc is None else acc + counts

    def add_token_layers(self, layers: list[int], num_experts: int, counts: list[np.ndarray], ids: np.ndarray,
                         weights: np.ndarray, request_rows: Optional[np.ndarray], request_of: np.ndarray,
                         prefill: np.ndarray, positions: np.ndarray, num_tokens: int) -> bool:
        """``add_layer`` for every layer of a step at once, where every layer routed the same
        tokens (ids, weights: [L, n, K]): one set of array operations for all of them, where
        a layer at a time costs more in calls than in counting. False (nothing added) where a
        layer's statistics are wider than ``num_experts``: add them a layer at a time."""
        stats = [self.layer(layer, num_experts) for layer in layers]
        if any(s.num_experts != num_experts for s in stats):
            return False
        L, n, k = ids.shape
        e = num_experts
        self.modes.add("tokens")
        self.top_k = max(self.top_k, k)
        if self._rows_of[0] is not positions:
            self._rows_of = (positions, position_rows(prefill, positions))
        rows = self._rows_of[1]
        layer_of = np.arange(L)[:, None, None]
        shape = stats[0].by_position.shape
        by_position = np.bincount(((layer_of * (2 * POSITION_BUCKETS) + rows[None, :, None]) * e + ids).ravel(),
                                  minlength=L * stats[0].by_position.size).reshape(L, *shape)
        by_rank = np.ascontiguousarray(weights.transpose(2, 0, 1), dtype=np.float32).reshape(k, L * n)
        top1, total = by_rank.max(axis=0).reshape(L, n), by_rank.sum(axis=0).reshape(L, n)
        top1_sums, total_sums = top1.sum(axis=1).tolist(), total.sum(axis=1).tolist()
        top1_hist, total_hist = _weight_histograms(top1), _weight_histograms(total)
        pairs = None
        if k > 1 and all(s.cooccurrence is not None for s in stats):
            a, b = _pairs_of(k)
            pairs = ids[:, :, a].astype(np.uint16)  # as add_tokens makes them, every layer's at once
            pairs *= e
            np.add(pairs, ids[:, :, b], out=pairs, casting="unsafe")
            pairs = pairs.reshape(L, -1)
        per_request = None
        if request_rows is not None and len(request_rows):
            r = len(request_rows)
            per_request = np.bincount(((layer_of * r + request_of[None, :, None]) * e + ids).ravel(),
                                      minlength=L * r * e).reshape(L, r, e)
        for i, (layer, s, c) in enumerate(zip(layers, stats, counts)):
            s.counts[: len(c)] += c
            s.tokens += num_tokens
            s.by_position += by_position[i]
            if n:
                s.top1_weight_sum += top1_sums[i]
                s.weight_sum += total_sums[i]
                s.weighted_tokens += n
                s.top1_hist += top1_hist[i]
                s.topk_sum_hist += total_hist[i]
            if pairs is not None:
                s.add_pairs(pairs[i])
            if per_request is not None:
                self.routing.add(request_rows, layer, e, per_request[i])
            acc = self._step_counts.get(layer)
            self._step_counts[layer] = c.astype(np.int64) if acc is None else acc + c
        return True

    def request_rows(self, request_ids: list) -> np.ndarray:
        """Each request's row in self.routing (-1: not kept), once per step for all its layers."""
        return np.asarray([self._request(r).row for r in request_ids], np.int64)

    def _request(self, request_id: str) -> RequestStats:
        mine = self.requests[request_id]
        if mine.row is None:
            mine.row = self.routing.new_row()
        return mine

    def add_request_tokens(self, request_ids: list, request_tokens: np.ndarray, prefill_tokens: np.ndarray) -> None:
        for request_id, tokens, prefill in zip(request_ids, request_tokens.tolist(), prefill_tokens.tolist()):
            mine = self._request(request_id)
            mine.tokens += tokens
            mine.prefill += prefill
            mine.decode += tokens - prefill

    def flush_step(self) -> None:
        values = {}
        layers = list(self._step_counts)
        if len({len(c) for c in self._step_counts.values()}) == 1:  # every layer's at once, row by row as below
            table = np.stack(list(self._step_counts.values()))
            means, maxes, stds = table.mean(axis=1).tolist(), table.max(axis=1).tolist(), table.std(axis=1).tolist()
        else:
            counts = list(self._step_counts.values())
            means, maxes, stds = [c.mean() for c in counts], [c.max() for c in counts], [c.std() for c in counts]
        for layer, mean, most, std in zip(layers, means, maxes, stds):
            if mean > 0:
                stats = self.layers[layer]
                values[layer] = float(most / mean)
                stats.max_over_mean.add(self._step_key, values[layer])
                stats.cv.add(self._step_key, float(std / mean))
        if self._step_counts:
            self.grid.add(self._step_key, self._step_tokens, values)
        self._step_counts = {}

    def finish(self) -> None:
        self.flush_step()
        self.grid.finish()
        for stats in self.layers.values():
            stats.flush_pairs()


def entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> Optional[float]:
    """Jensen-Shannon divergence (bits, 0..1) of two count vectors; None if either is empty."""
    size = max(len(p), len(q))
    p, q = np.pad(np.asarray(p, float), (0, size - len(p))), np.pad(np.asarray(q, float), (0, size - len(q)))
    if p.sum() <= 0 or q.sum() <= 0:
        return None
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return max(0.0, (kl(p) + kl(q)) / 2)

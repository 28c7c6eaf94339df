"""Per-step snapshot of the capture buffers, without stalling the engine loop.

On CUDA the copy is queued on the current stream right after the step's
forward (non_blocking, into pinned host memory) and an event marks its end;
the consumer thread waits on the event, never the engine. A small ring of
pinned slots bounds host memory: with no free slot the step is dropped.
On CPU the forward has already finished when the step returns, so a plain
copy is taken.
"""
from __future__ import annotations

import dataclasses
import queue
from typing import Callable, Optional

import numpy as np
import torch

from otel_moe.capture import RoutingBuffers


@dataclasses.dataclass
class Snapshot:
    ids: Optional[torch.Tensor]  # [n, L, K] host
    weights: Optional[torch.Tensor]
    counts: Optional[torch.Tensor]  # [L, E] host
    event: Optional[torch.cuda.Event] = None
    release: Optional[Callable[[], None]] = None

    def to_numpy(self) -> tuple[Optional[np.ndarray], ...]:
        """Wait for the copy, take numpy copies, and give the slot back."""
        try:
            if self.event is not None:
                self.event.synchronize()
            return tuple(None if t is None else t.numpy().copy() for t in (self.ids, self.weights, self.counts))
        finally:
            if self.release is not None:
                self.release()


def device_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[n, L, K] expert ids -> [L, E] int64 counts, on the ids' device, no host sync."""
    num_layers = ids.shape[1]
    base = torch.arange(num_layers, device=ids.device, dtype=torch.int64).view(1, -1, 1) * num_experts
    flat = (ids.to(torch.int64) + base).reshape(-1)
    trash = num_layers * num_experts  # uncaptured rows (-1) land here and are cut off
    flat = torch.where(ids.reshape(-1) < 0, torch.full_like(flat, trash), flat)
    counts = torch.zeros(trash + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts[:trash].view(num_layers, num_experts)


class Snapshotter:
    """Takes snapshots of some columns (layers) of the buffers, as ids or as counts.

    Which columns and which form can change from step to step (live control),
    so each pinned slot is a flat buffer big enough for all columns and both
    forms that may be asked for, viewed at the step's shape.
    """

    def __init__(self, buffers: RoutingBuffers, modes: tuple[str, ...], slots: int = 16) -> None:
        self.buffers = buffers
        self.on_cuda = buffers.ids.is_cuda
        self._free: "queue.SimpleQueue[int]" = queue.SimpleQueue()
        self._host: list[dict[str, torch.Tensor]] = []
        if self.on_cuda:
            sizes = {}
            if "tokens" in modes:
                sizes.update(ids=(buffers.ids.numel(), torch.int32), weights=(buffers.weights.numel(), torch.float32))
            if "counts" in modes:
                sizes["counts"] = (len(buffers.layers) * buffers.num_experts, torch.int64)
            for slot in range(slots):
                self._host.append({k: torch.empty(n, dtype=d, pin_memory=True) for k, (n, d) in sizes.items()})
                self._free.put(slot)

    def take(self, num_tokens: int, columns: Optional[torch.Tensor], counts_only: bool) -> Optional[Snapshot]:
        """Snapshot rows 0..num_tokens-1 of ``columns`` (all when ``None``);
        ``None`` when no host slot is free (drop)."""
        ids = self.buffers.ids[:num_tokens]
        weights = None if counts_only else self.buffers.weights[:num_tokens]
        if columns is not None:  # index_select copies: the CPU path needs no clone then
            ids = ids.index_select(1, columns)
            weights = None if counts_only else weights.index_select(1, columns)
        if not self.on_cuda:
            if counts_only:
                return Snapshot(None, None, device_counts(ids, self.buffers.num_experts))
            if columns is None:
                ids, weights = ids.clone(), weights.clone()
            return Snapshot(ids, weights, None)
        try:
            slot = self._free.get_nowait()
        except queue.Empty:
            return None
        host = self._host[slot]
        if counts_only:
            counts = device_counts(ids, self.buffers.num_experts)
            snap = Snapshot(None, None, _pinned_view(host["counts"], counts).copy_(counts, non_blocking=True))
        else:
            host_ids = _pinned_view(host["ids"], ids).copy_(ids, non_blocking=True)
            host_w = _pinned_view(host["weights"], weights).copy_(weights, non_blocking=True)
            snap = Snapshot(host_ids, host_w, None)
        snap.event = torch.cuda.Event()
        snap.event.record()
        snap.release = lambda: self._free.put(slot)
        return snap


def _pinned_view(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The front of a flat pinned buffer, shaped like ``like`` (contiguous)."""
    return flat[: like.numel()].view(like.shape)

"""Per-step snapshot of the capture buffers into the shared ring, without stalling the engine loop.

On CUDA the copy is queued on the current stream right after the step's
forward (non_blocking, into the page-locked ring) and an event marks its end;
the exporter link's thread waits on the event, never the engine. On CPU the
forward has already finished when the step returns, so a plain copy is taken.
Either way the engine thread touches no per-token data in Python.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from otel_moe.capture import RoutingBuffers
from otel_moe.ring import FifoSpace

ARRAY_ALIGN = 8  # every array in the ring starts on an 8-byte boundary (int64 counts)
_NUMPY_DTYPE = {torch.uint8: "|u1", torch.int16: "<i2", torch.float16: "<f2", torch.int64: "<i8",
                torch.int32: "<i4", torch.float32: "<f4"}


@dataclasses.dataclass
class Snapshot:
    offset: int  # in the ring
    arrays: list  # [(numpy dtype string, shape list)], laid out one after the other from offset
    event: Optional[torch.cuda.Event] = None  # CUDA: the copy is done once this completes


def device_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[n, L, K] expert ids -> [L, E] int64 counts, on the ids' device, no host sync."""
    num_layers = ids.shape[1]
    base = torch.arange(num_layers, device=ids.device, dtype=torch.int64).view(1, -1, 1) * num_experts
    flat = (ids.to(torch.int64) + base).reshape(-1)
    trash = num_layers * num_experts  # ids of a layer never captured (the fill value) land here
    flat = torch.where(ids.reshape(-1).to(torch.int64) >= num_experts, torch.full_like(flat, trash), flat)
    counts = torch.zeros(trash + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts[:trash].view(num_layers, num_experts)


def array_bytes(arrays: list) -> list[int]:
    """Each array's start, relative to the snapshot's offset, and the total at the end."""
    starts, position = [], 0
    for dtype, shape in arrays:
        starts.append(position)
        position += -(-np.dtype(dtype).itemsize * int(np.prod(shape)) // ARRAY_ALIGN) * ARRAY_ALIGN
    return starts + [position]


class Snapshotter:
    """Copies some columns (layers) of the buffers, as ids and weights or as counts,
    into space reserved in the ring. Which columns and which form can change from
    step to step (live control)."""

    def __init__(self, buffers: RoutingBuffers, ring: torch.Tensor, space: FifoSpace) -> None:
        self.buffers = buffers
        self.ring = ring  # uint8, the whole shared region
        self.space = space
        self.on_cuda = buffers.ids.is_cuda

    def take(self, num_tokens: int, columns: Optional[torch.Tensor], counts_only: bool) -> Optional[Snapshot]:
        """Snapshot rows 0..num_tokens-1 of ``columns`` (all when ``None``);
        ``None`` when the ring has no room (drop)."""
        ids = self.buffers.ids[:num_tokens]
        if columns is not None:
            ids = ids.index_select(1, columns)
        if counts_only:
            sources = [device_counts(ids, self.buffers.num_experts)]
        else:
            weights = self.buffers.weights[:num_tokens]
            sources = [ids, weights if columns is None else weights.index_select(1, columns)]
        arrays = [(_NUMPY_DTYPE[t.dtype], list(t.shape)) for t in sources]
        *starts, total = array_bytes(arrays)
        offset = self.space.reserve(total)
        if offset is None:
            return None
        for start, source in zip(starts, sources):
            at = offset + start
            target = self.ring[at: at + source.numel() * source.element_size()]
            target.view(source.dtype).view(source.shape).copy_(source, non_blocking=self.on_cuda)
        event = None
        if self.on_cuda:
            event = torch.cuda.Event()
            event.record()
        return Snapshot(offset, arrays, event)

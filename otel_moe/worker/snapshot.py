"""Per-step snapshot of the capture buffers into the shared ring, without stalling the engine loop.

On CUDA the copy is queued on the current stream right after the step's
forward (non_blocking, into the page-locked ring), followed on the same stream
by a 4-byte copy of the snapshot's mark into the ring's mark cell: the exporter
process waits for the mark, nobody in vLLM's process waits for anything. On CPU
the forward has already finished when the step returns, so a plain copy is
taken and needs no mark.
Either way the engine thread touches no per-token data in Python.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from otel_moe.wire import ring as shared
from otel_moe.wire.messages import NO_MARK, array_bytes
from otel_moe.wire.ring import FifoSpace, SharedRing
from otel_moe.worker.capture import RoutingBuffers

MAX_CACHED_LAYOUTS = 4096  # token counts whose ring layouts are kept
_NUMPY_DTYPE = {torch.uint8: "|u1", torch.int16: "<i2", torch.float16: "<f2", torch.int64: "<i8",
                torch.int32: "<i4", torch.float32: "<f4"}


@dataclasses.dataclass
class Snapshot:
    offset: int  # in the ring
    arrays: list  # [(numpy dtype string, shape list)], laid out one after the other from offset
    mark: int  # CUDA: the copy has landed once the ring's mark has reached this; NO_MARK: it has
    extra_offset: int = -1  # where the extra bytes asked for start (after the arrays)



class Snapshotter:
    """Copies some columns (layers) of the buffers, as ids and weights (a step) or
    as counts (a window of steps), into space reserved in the ring. Which columns
    and which form can change from step to step (live control)."""

    def __init__(self, buffers: RoutingBuffers, ring: SharedRing, space: FifoSpace,
                 on_full: Optional[Callable[[], None]] = None) -> None:
        """``on_full``: called when a reservation does not fit, to free what can be freed
        (the exporter's acknowledgements), before it is tried once more."""
        self.buffers = buffers
        self.ring = ring.tensor()  # uint8, the whole shared region (page-locked on CUDA)
        self._ring_as = {}  # dtype -> the region viewed as it (its size is a multiple of 8)
        self.space = space
        self.on_full = on_full
        self.on_cuda = buffers.on_cuda
        # tokens -> the ring layout of the first rows of ids and weights: on a GPU vLLM's
        # engine thread is busy nearly all of a step, so each torch call it makes costs throughput.
        self._first_rows: dict[int, _Layout] = {}
        self._marks = _CopyMarks(buffers.device, self.ring[ring.nbytes:ring.nbytes + 4].view(torch.int32)) \
            if self.on_cuda else None

    def take_tokens(self, num_tokens: int, columns: Optional[torch.Tensor]) -> Optional[Snapshot]:
        """Ids and weights of rows 0..num_tokens-1 of ``columns`` (all when ``None``);
        ``None`` when the ring has no room (drop)."""
        ids, weights = self.buffers.ids, self.buffers.weights
        if columns is not None:
            return self._into_ring(_Layout.of([ids[:num_tokens].index_select(1, columns),
                                               weights[:num_tokens].index_select(1, columns)]))
        layout = self._first_rows.get(num_tokens)
        if layout is None:  # made once per token count (a bounded few)
            if len(self._first_rows) >= MAX_CACHED_LAYOUTS:
                self._first_rows.clear()
            layout = self._first_rows[num_tokens] = _Layout.of([ids[:num_tokens], weights[:num_tokens]])
        return self._into_ring(layout)

    def take_counts(self, columns: Optional[torch.Tensor], extra_bytes: int = 0) -> Optional[Snapshot]:
        """The device counters of ``columns``, [L, E], with room for ``extra_bytes`` more
        after them (the recorder zeroes them when the next window opens)."""
        counts = self.buffers.counts[:, : self.buffers.num_experts]
        if columns is not None:
            counts = counts.index_select(0, columns)
        return self._into_ring(_Layout.of([counts]), extra_bytes)

    def _into_ring(self, layout: "_Layout", extra_bytes: int = 0) -> Optional[Snapshot]:
        offset = self.space.reserve(layout.total + extra_bytes)
        if offset is None and self.on_full is not None:
            self.on_full()
            offset = self.space.reserve(layout.total + extra_bytes)
        if offset is None:
            return None
        if self._marks is not None:
            self._marks.follow_current_stream()
        for start, itemsize, numel, source, shape in layout.copies:
            ring = self._ring_as.get(source.dtype)
            if ring is None:
                ring = self._ring_as[source.dtype] = self.ring.view(source.dtype)
            at = (offset + start) // itemsize
            into = ring[at: at + numel]
            (into if shape is None else into.view(shape)).copy_(source, non_blocking=self.on_cuda)
        mark = self._marks.mark() if self._marks is not None else NO_MARK
        return Snapshot(offset, layout.arrays, mark, offset + layout.total)


class _CopyMarks:
    """CUDA: after a snapshot's copies, the next mark (0, 1, ... modulo ring.MARKS) is
    copied into the ring's mark cell on the same stream, so it lands after them.

    The mark comes from a device table of every mark (one small copy, no kernel). The
    stream is the current one, checked with one C call (``torch.cuda.current_stream()``
    finds it in Python: under cProfile the largest item of a tokens step on vLLM's
    engine thread on an H200); were it to change, the new stream first waits for the
    old one on the device, so marks still land in the order they were given."""

    def __init__(self, device: torch.device, cell: torch.Tensor) -> None:
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.table = torch.arange(shared.MARKS, dtype=torch.int32, device=device)
        self.cell = cell  # int32 [1], in the page-locked ring
        self.next = 0
        self.stream = torch.cuda.current_stream(self.index)
        self._current_stream_id = getattr(torch._C, "_cuda_getCurrentStream", None)  # (id, device, type)

    def follow_current_stream(self) -> None:
        if self._current_stream_id is not None and self._current_stream_id(self.index)[0] == self.stream.stream_id:
            return
        current = torch.cuda.current_stream(self.index)
        if current.stream_id != self.stream.stream_id:
            current.wait_stream(self.stream)
            self.stream = current

    def mark(self) -> int:
        mark = self.next
        self.next = (mark + 1) % shared.MARKS
        self.cell.copy_(self.table[mark: mark + 1], non_blocking=True)
        return mark


@dataclasses.dataclass
class _Layout:
    """Arrays as they lie in the ring, one after the other: their names for the exporter
    (``arrays``), their total bytes, and per array what one copy needs (``copies``: byte
    start, item size, elements, the device tensor, and the shape to copy it into when it
    is strided, else ``None``: it is copied flat)."""

    arrays: list
    total: int
    copies: list[tuple]

    @classmethod
    def of(cls, sources: list[torch.Tensor]) -> "_Layout":
        """Of device tensors (views, so a cached layout follows what they hold)."""
        arrays = [(_NUMPY_DTYPE[t.dtype], list(t.shape)) for t in sources]
        *starts, total = array_bytes(arrays)
        copies = [(start, t.element_size(), t.numel(), t.view(-1), None) if t.is_contiguous()
                  else (start, t.element_size(), t.numel(), t, t.shape) for start, t in zip(starts, sources)]
        return cls(arrays, total, copies)

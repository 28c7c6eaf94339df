"""The channel between a recording vLLM worker and its exporter process.

Two parts, both set up when the model loads:
  - ``SharedRing``: one shared-memory region (an anonymous memfd, passed to the
    exporter as a file descriptor, so nothing is left behind if either side is
    killed). Step snapshots are copied into it straight from the device (on
    CUDA the region is page-locked, so the copy is asynchronous).
  - A ``SOCK_SEQPACKET`` socket pair carrying small messages (``messages``: the
    step's layout inputs and where its bytes lie in the ring, new and finished
    requests, close). The exporter answers with the number of steps it is done with.
  - The copy mark, an int32 after the ring's bytes (CUDA): after each snapshot's
    device copies the GPU writes the snapshot's mark there, on the same stream, so
    a mark that has arrived means every copy queued before it has landed. The
    engine thread sends a step's message at once; the exporter waits for its mark.

Invariants:
  - The ring is a byte FIFO: the engine thread reserves space for each step at
    the head, the exporter finishes steps in the order they were sent, and
    every finished step frees the oldest reservation. Only the engine thread
    reserves and frees, so no lock is needed.
  - A step that finds no room is dropped and counted, never waited for.
  - Space is reserved for every message that carries ring bytes (a tokens-mode
    step, a counts window), and only for those; the exporter acknowledges exactly
    those, so its acknowledgements free exactly what was reserved.
  - Marks count up modulo ``MARKS``, one per reservation, and fewer than ``MAX_HELD``
    reservations are ever held (one whose message could not go stays held until a
    SKIP in its place is acknowledged): the mark that has landed is less than
    ``MAX_HELD`` behind or ahead of any awaited one, so the difference tells which.
"""
from __future__ import annotations

import collections
import mmap
import os
import socket
from typing import Optional

import numpy as np

from otel_moe.wire.messages import NO_MARK

ALIGN = 64
MARKS = 4096
MAX_HELD = MARKS // 2  # snapshots in the ring at once, at most
MARK_BYTES = ALIGN  # the mark's room after the ring's bytes


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(worker end, exporter end): message boundaries kept, ordered, reliable."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class SharedRing:
    """A shared-memory byte region (``nbytes`` for snapshots, then the copy mark); the
    worker creates it, the exporter maps the same fd."""

    def __init__(self, nbytes: int, fd: Optional[int] = None) -> None:
        self.nbytes = nbytes
        created = fd is None
        if created:
            fd = os.memfd_create("otel-moe-ring")  # close-on-exec; passed on explicitly
            os.ftruncate(fd, nbytes + MARK_BYTES)
        self.fd = fd
        # The worker's side populated now: until the ring first wrapped, each step's copy
        # into pages never touched took a fault a page on the engine thread (12 KB: 13 ->
        # 5 us on the CPU machine). On CUDA page-locking makes them resident anyway. The
        # exporter's side faults in as it reads (its own time).
        populate = getattr(mmap, "MAP_POPULATE", 0) if created else 0
        self.map = mmap.mmap(fd, nbytes + MARK_BYTES, flags=mmap.MAP_SHARED | populate)
        self._mark = np.frombuffer(self.map, dtype=np.int32, count=1, offset=nbytes)
        if created:
            self._mark[0] = MARKS - 1  # the mark before the first
        self.pinned = False

    def tensor(self):
        """The whole region, mark included, as a torch uint8 tensor (no copy), page-locked on CUDA."""
        import torch

        region = torch.frombuffer(self.map, dtype=torch.uint8)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cudart = torch.cuda.cudart()
            status = cudart.cudaHostRegister(region.data_ptr(), self.nbytes + MARK_BYTES, 0)
            self.pinned = status == cudart.cudaError.success and region.is_pinned()
        return region

    def landed(self, mark: int) -> bool:
        """Exporter side: have the copies of the snapshot marked ``mark`` landed?"""
        return mark == NO_MARK or (int(self._mark[0]) - mark) % MARKS < MAX_HELD

    def array(self, offset: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
        """A numpy view of bytes ``offset`` on (exporter side)."""
        count = int(np.prod(shape))
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=offset).reshape(shape)


class FifoSpace:
    """Byte FIFO allocation over a ring of ``capacity`` bytes (worker side)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.head = 0
        self.held: "collections.deque[tuple[int, int]]" = collections.deque()  # (start, end), oldest first

    def reserve(self, nbytes: int) -> Optional[int]:
        """The offset of ``nbytes`` free bytes, or ``None`` when they do not fit now
        (or ``MAX_HELD`` reservations are held already)."""
        if len(self.held) >= MAX_HELD:
            return None
        nbytes = -(-max(nbytes, 1) // ALIGN) * ALIGN
        if not self.held:
            self.head = 0
        tail = self.held[0][0] if self.held else 0
        if self.held and self.head <= tail:  # wrapped: free space is [head, tail)
            offset = self.head if tail - self.head >= nbytes else None
        elif self.capacity - self.head >= nbytes:  # free space is [head, end) and [0, tail)
            offset = self.head
        else:
            offset = 0 if tail >= nbytes and self.held else None
        if offset is None:
            return None
        self.head = offset + nbytes
        self.held.append((offset, self.head))
        return offset

    def free_oldest(self, count: int) -> None:
        for _ in range(min(count, len(self.held))):
            self.held.popleft()

"""The channel between a recording vLLM worker and its exporter process.

Two parts, both set up when the model loads:
  - ``SharedRing``: one shared-memory region (an anonymous memfd, passed to the
    exporter as a file descriptor, so nothing is left behind if either side is
    killed). Step snapshots are copied into it straight from the device (on
    CUDA the region is page-locked, so the copy is asynchronous).
  - A ``SOCK_SEQPACKET`` socket pair carrying small messages (``marshal``ed
    tuples of lists, strings and ints; never arrays): the step's layout inputs
    and where its bytes lie in the ring, new and finished requests, close.
    The exporter answers with the number of steps it is done with.

Invariants:
  - The ring is a byte FIFO: the engine thread reserves space for each step at
    the head, the exporter finishes steps in the order they were sent, and
    every finished step frees the oldest reservation. Only the engine thread
    reserves and frees, so no lock is needed.
  - A step that finds no room is dropped and counted, never waited for.
  - Space is reserved for every message that carries ring bytes (a tokens-mode
    step, a counts window), and only for those; the exporter acknowledges exactly
    those, so its acknowledgements free exactly what was reserved.
"""
from __future__ import annotations

import collections
import marshal
import mmap
import os
import socket
import struct
from typing import Optional

import numpy as np

ALIGN = 64
# message kinds (the first element of every message tuple)
BEGIN = 1  # (BEGIN, finished ids, partial ids, [(id, prompt_len)] of new requests)
STEP = 2  # see StepMessage
CLOSE = 3  # (CLOSE,): flush and exit
WINDOW = 4  # counts mode: a window of steps' expert counts, see exporter.process.WindowMessage
SKIP = 5  # (SKIP,): a message that held ring space could not be sent; acknowledge its space
ACK = struct.Struct("<I")  # exporter -> worker: steps finished since the last ack


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(worker end, exporter end): message boundaries kept, ordered, reliable."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def encode(message: tuple) -> bytes:
    return marshal.dumps(message)


def decode(data: bytes) -> tuple:
    return marshal.loads(data)


class SharedRing:
    """A shared-memory byte region; the worker creates it, the exporter maps the same fd."""

    def __init__(self, nbytes: int, fd: Optional[int] = None) -> None:
        self.nbytes = nbytes
        if fd is None:
            fd = os.memfd_create("otel-moe-ring")  # close-on-exec; passed on explicitly
            os.ftruncate(fd, nbytes)
        self.fd = fd
        self.map = mmap.mmap(fd, nbytes)
        self.pinned = False

    def tensor(self):
        """The whole region as a torch uint8 tensor (no copy), page-locked on CUDA."""
        import torch

        region = torch.frombuffer(self.map, dtype=torch.uint8)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cudart = torch.cuda.cudart()
            status = cudart.cudaHostRegister(region.data_ptr(), self.nbytes, 0)
            self.pinned = status == cudart.cudaError.success and region.is_pinned()
        return region

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
        """The offset of ``nbytes`` free bytes, or ``None`` when they do not fit now."""
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

    def unreserve_newest(self) -> None:
        """Give back the reservation just made (its step could not be sent)."""
        self.held.pop()
        self.head = self.held[-1][1] if self.held else 0

    def free_oldest(self, count: int) -> None:
        for _ in range(min(count, len(self.held))):
            self.held.popleft()

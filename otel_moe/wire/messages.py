"""The messages between a recording worker and its exporter process: their kinds,
their fields (declared here once; the worker builds them, the exporter reads them),
their bytes, and where a message's arrays lie in the shared ring.

A message goes on the socket as one ``marshal``led tuple ``(kind, *fields)``:
lists, strings and ints only, never arrays (those are in the ring). marshal is
C from end to end, the cheapest encoding there is for vLLM's engine thread.
The exporter answers with ``ACK``: the number of steps it is done with.

numpy only: the exporter process imports this, and never torch or vLLM.
"""
from __future__ import annotations

import marshal
import math
import struct
from typing import NamedTuple, Optional, Union

import numpy as np

BEGIN = 1  # Begin: finished and new requests, before a step
STEP = 2  # Step: one engine step (tokens mode: with its ids and weights in the ring)
CLOSE = 3  # (CLOSE,): flush and exit
WINDOW = 4  # Window: counts mode, a window of steps' expert counts (and its held-back messages) in the ring
SKIP = 5  # (SKIP,): a message that held ring space could not be sent; acknowledge its space
ACK = struct.Struct("<I")  # exporter -> worker: steps finished since the last ack
NO_MARK = -1  # a message whose ring bytes were written before it was sent (CPU), or that has none
MAX_MESSAGE = 1 << 21  # bytes of one message, at most


class Begin(NamedTuple):
    """Before a step: requests vLLM reported finished, those of them live control left
    recorded in part, and the newly scheduled ones with their prompt lengths and trace
    context (what vLLM's front end handed the engine; "" and 0 where it handed none)."""

    finished: list  # internal request ids
    partial: list
    new: list  # [(internal request id, prompt length, traceparent, tracestate, arrival time in ns)]


class Step(NamedTuple):
    """One engine step. Its layout (the last six fields) leaves out what the previous
    step's said already (``step_layout``)."""

    offset: int  # ring bytes of the step's ids and weights; -1: none (counts mode)
    arrays: list  # [(numpy dtype string, shape)] laid out from offset (``array_bytes``)
    mark: int  # the ring's copy mark once they have landed (CUDA); NO_MARK: they have
    step: int
    start_ns: int
    end_ns: int
    layers: list
    counts_only: bool
    control_version: int
    dropped_steps: int
    dropped_tokens: int
    engine_thread_ns: int  # the recorder's time on vLLM's engine thread before this step, cumulative
    total: int  # tokens the scheduler scheduled
    batch_order: Optional[list]  # internal request ids, the runner's batch order (None: counts mode, any order)
    scheduled: dict  # request id -> tokens this step (SchedulerOutput.num_scheduled_tokens)
    cached_ids: list  # running requests (scheduled_cached_reqs.req_ids) ...
    cached_computed: list  # ... and their tokens computed before this step
    new: list  # [(request id, tokens computed before this step)] of newly scheduled requests


class Window(NamedTuple):
    """Counts mode: steps first..last, counted on the device; the window's held-back
    messages (its steps' layouts, new and finished requests) lie in the ring after the counts."""

    offset: int
    arrays: list  # one: [layers, experts] int64
    mark: int  # as Step's
    items_offset: int
    items_bytes: int
    first: int
    last: int
    tokens: int
    start_ns: int
    end_ns: int
    layers: list
    control_version: int
    dropped_steps: int
    dropped_tokens: int
    engine_thread_ns: int


Message = Union[Begin, Step, Window]
_KIND = {Begin: BEGIN, Step: STEP, Window: WINDOW}
_TYPE = {BEGIN: Begin, STEP: Step, WINDOW: Window}


def as_tuple(message: Message) -> tuple:
    """``(kind, *fields)``, a plain tuple (marshal takes no subclass of one)."""
    return (_KIND[type(message)],) + message


def encode(value) -> bytes:
    return marshal.dumps(value)


def decode(data: bytes):
    return marshal.loads(data)


def typed(item: tuple) -> Union[Message, int]:
    """A decoded ``(kind, *fields)`` -> its message, or the kind alone (CLOSE, SKIP)."""
    kind = item[0]
    cls = _TYPE.get(kind)
    return cls(*item[1:]) if cls is not None else kind


# ---- a message's arrays in the ring -------------------------------------
ARRAY_ALIGN = 8  # every array in the ring starts on an 8-byte boundary (int64 counts)
_ITEMSIZE = {name: np.dtype(name).itemsize for name in ("|u1", "<i2", "<f2", "<i8", "<i4", "<f4")}


def array_bytes(arrays: list) -> list[int]:
    """Each array's start, relative to the message's offset, and the total at the end."""
    starts, position = [], 0
    for dtype, shape in arrays:
        starts.append(position)
        position += -(-_ITEMSIZE[dtype] * math.prod(shape) // ARRAY_ALIGN) * ARRAY_ALIGN
    return starts + [position]

"""The exporter process: everything after the snapshot, outside vLLM's process.

One per recording worker, started when its model loads (``python -m otel_moe
exporter --spec JSON``). It reads the worker's messages in order, lays each
step's ring bytes out as a ``StepRecord`` (request ids, positions, phases),
hands it to the sinks (JSONL text, OpenTelemetry spans and their export, request
tallies) and acknowledges the step, which frees its ring space. In counts mode
a window's message brings the device counters and, in the ring beside them,
the window's own messages (its steps' layouts, new and finished requests).

It exits when the worker asks (flushing first), or when the worker is gone
(socket closed, or it was re-parented), flushing within a bounded time.
"""
from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import socket
import sys
import time
from typing import Optional

import numpy as np

from otel_moe.config import DEFAULT_METRICS
from otel_moe.exporter.records import StepRecord, external_request_id
from otel_moe.exporter.sinks import Sink, SinkSpec, open_sinks
from otel_moe.scheduling import leave_cpus, never_preempt_on_wakeup
from otel_moe.wire import messages
from otel_moe.wire.messages import ACK, CLOSE, SKIP, Begin, Step, Window, array_bytes, typed
from otel_moe.wire.ring import SharedRing
from otel_moe.wire.step_layout import LayoutDecoder

logger = logging.getLogger("vllm.otel_moe")
IDLE_FLUSH_S = 1.0  # a sink with pending output flushes after this long without steps
PARENT_CHECK_S = 1.0
CLOSE_TIMEOUT_S = 10.0  # the final flush, when the worker is gone or asks to close
COPY_POLL_FIRST_S, COPY_POLL_MAX_S = 50e-6, 2e-3  # waiting for a step's device copy


class WorkerGone(Exception):
    """The worker exited while a step's device copy was awaited."""


class Receiver:
    """Reads one worker's messages in order, lays each step out as a ``StepRecord`` and
    hands it to the sinks; acknowledges ring space once a step is done with it."""

    def __init__(self, spec: dict, sink: Sink) -> None:
        self.sink = sink
        self.ring = SharedRing(spec["ring_bytes"], fd=spec["ring_fd"])
        self.sock = socket.socket(fileno=spec["socket_fd"])
        self.parent_pid = spec["parent_pid"]
        self.top_k, self.num_experts = spec["top_k"], spec["num_experts"]
        self.dp_rank = spec["dp_rank"]
        self.internal_suffix = re.compile(spec["internal_id_suffix"]) if spec.get("internal_id_suffix") else None
        self.prompt_lens: dict[str, int] = {}  # internal id -> prompt length, while live
        self.external_ids: dict[str, str] = {}
        self.steps = self.layout_drops = self.failed_steps = 0
        self.unacknowledged = 0  # steps done whose acknowledgement the worker's socket had no room for
        self.layouts = LayoutDecoder()

    def run(self) -> None:
        last_step = time.monotonic()
        while True:
            readable, _, _ = select.select([self.sock], [], [], min(IDLE_FLUSH_S, PARENT_CHECK_S))
            if self.unacknowledged:
                self._acknowledge(0)
            if not readable:
                if os.getppid() != self.parent_pid:  # the worker is gone, though another process holds its socket
                    return
                if time.monotonic() - last_step >= IDLE_FLUSH_S:
                    self._safely(self.sink.idle)
                continue
            data = self.sock.recv(messages.MAX_MESSAGE)
            if not data:
                return  # the worker is gone
            message = typed(messages.decode(data))
            if message == CLOSE:
                return
            if not isinstance(message, Begin):
                last_step = time.monotonic()
            self._handle(message)

    def _handle(self, message) -> None:
        if isinstance(message, Begin):
            self._safely(self._begin, *message)
        elif isinstance(message, Step):
            self._step(message)
        elif isinstance(message, Window):
            self._window(message)
        elif message == SKIP:
            self._acknowledge()

    def _safely(self, call, *args) -> None:
        try:
            call(*args)
        except Exception:  # a sink problem must never stop the exporter
            self.failed_steps += 1
            if self.failed_steps == 1:
                logger.exception("otel-moe: writing a step failed; later failures are only counted")

    def _begin(self, finished: list, partial: list, new: list) -> None:
        if finished:
            external = {r: self._external(r, forget=True) for r in finished}
            for request_id in finished:
                self.prompt_lens.pop(request_id, None)
            self.sink.finish(list(external.values()), {external[r] for r in partial})
        for request_id, prompt_len, *_ in new:
            self.prompt_lens[request_id] = prompt_len
        if new:
            self.sink.begin([(self._external(request_id), *trace) for request_id, _, *trace in new])

    def _external(self, internal_id: str, forget: bool = False) -> str:
        if forget:
            return self.external_ids.pop(internal_id, None) or external_request_id(internal_id, self.internal_suffix)
        external = self.external_ids.get(internal_id)
        if external is None:
            external = self.external_ids[internal_id] = external_request_id(internal_id, self.internal_suffix)
        return external

    def _step(self, message: Step, layouts: Optional[LayoutDecoder] = None) -> None:
        """``layouts``: a counts window's own decoder (its steps' layouts refer to one another only)."""
        arrays = self._take_arrays(message.offset, message.arrays, message.mark)
        self.steps += 1
        try:
            batch_order, scheduled, cached_ids = (layouts or self.layouts).decode(
                message.batch_order, message.scheduled, message.cached_ids)
            message = message._replace(batch_order=batch_order, scheduled=scheduled, cached_ids=cached_ids)
        except ValueError as error:
            self._drop_layout(message.step, str(error))
            return
        record = self._record(message, arrays)
        if record is not None:
            self._safely(self.sink.write, record)

    def _window(self, message: Window) -> None:
        items = messages.decode(bytes(self.ring.map[message.items_offset: message.items_offset + message.items_bytes]))
        (counts,) = self._take_arrays(message.offset, message.arrays, message.mark)
        layouts = LayoutDecoder()
        for item in map(typed, items):  # the window's steps (layouts only) and new and finished requests, in order
            if isinstance(item, Step):
                self._step(item, layouts)
            else:
                self._handle(item)
        empty = np.zeros(0, np.int64)
        self._safely(self.sink.write, StepRecord(
            step=message.first, last_step=message.last, window_tokens=message.tokens,
            start_ns=message.start_ns, end_ns=message.end_ns, layers=message.layers, top_k=self.top_k,
            num_experts=self.num_experts, request_ids=[], request_tokens=empty, positions=empty, prompt_lens=empty,
            counts=counts, dp_rank=self.dp_rank, dropped_steps=message.dropped_steps + self.layout_drops,
            dropped_tokens=message.dropped_tokens, control_version=message.control_version,
            engine_thread_ns=message.engine_thread_ns))

    def _take_arrays(self, offset: int, arrays: list, mark: int) -> list[np.ndarray]:
        """Copies of a message's arrays, once their device copy has landed; their ring
        space is free again once taken."""
        if offset < 0:
            return []
        self._wait_for_copy(mark)
        try:
            starts = array_bytes(arrays)
            return [np.array(self.ring.array(offset + start, np.dtype(dtype), tuple(shape)))
                    for start, (dtype, shape) in zip(starts, arrays)]
        finally:
            self._acknowledge()

    def _wait_for_copy(self, mark: int) -> None:
        """The engine thread sends a step's message as soon as its copy is queued: the
        GPU is usually a step behind. Short sleeps, longer ones while it is not there."""
        pause = COPY_POLL_FIRST_S
        while not self.ring.landed(mark):
            time.sleep(pause)
            pause = min(2 * pause, COPY_POLL_MAX_S)
            if pause == COPY_POLL_MAX_S and os.getppid() != self.parent_pid:
                raise WorkerGone  # its device copies will never land

    def _acknowledge(self, steps: int = 1) -> None:
        """Never waits: the worker reads acknowledgements only every so many steps (and
        not at all while it closes), so when they do not fit they add up and go later."""
        self.unacknowledged += steps
        try:
            self.sock.send(ACK.pack(self.unacknowledged), socket.MSG_DONTWAIT)
            self.unacknowledged = 0
        except BlockingIOError:
            pass
        except OSError:
            pass  # the worker is gone: the next read says so

    def _record(self, message: Step, arrays: list[np.ndarray]):
        starts = dict(zip(message.cached_ids, message.cached_computed))
        starts.update(message.new)
        tokens_of = message.scheduled
        order = tokens_of if message.batch_order is None else message.batch_order
        scheduled = [(r, tokens_of[r], starts.get(r)) for r in order if tokens_of.get(r)]
        tokens = np.fromiter((t for _, t, _ in scheduled), dtype=np.int64, count=len(scheduled))
        if int(tokens.sum()) != message.total or any(f is None for _, _, f in scheduled):
            self._drop_layout(message.step, f"the batch covers {int(tokens.sum())} tokens, the scheduler "
                                            f"scheduled {message.total}")
            return None
        first = np.fromiter((f for _, _, f in scheduled), dtype=np.int64, count=len(scheduled))
        offsets = np.arange(message.total, dtype=np.int64) - np.repeat(np.cumsum(tokens) - tokens, tokens)
        prompt = np.fromiter((self.prompt_lens.get(r, 0) for r, _, _ in scheduled), dtype=np.int64, count=len(scheduled))
        ids = weights = None
        if arrays:  # tokens mode; in counts mode the step carries only its layout (requests' token counts)
            ids, weights = arrays  # weights in float16, as captured
        return StepRecord(
            step=message.step, start_ns=message.start_ns, end_ns=message.end_ns, layers=message.layers,
            top_k=self.top_k, num_experts=self.num_experts,
            request_ids=[self._external(r) for r, _, _ in scheduled], request_tokens=tokens,
            positions=np.repeat(first, tokens) + offsets, prompt_lens=prompt,
            ids=ids, weights=weights, dp_rank=self.dp_rank,
            dropped_steps=message.dropped_steps + self.layout_drops, dropped_tokens=message.dropped_tokens,
            control_version=message.control_version, engine_thread_ns=message.engine_thread_ns,
        )

    def _drop_layout(self, step: int, why: str) -> None:
        self.layout_drops += 1
        if self.layout_drops == 1:
            logger.warning("otel-moe: step %d: %s; such steps are dropped and counted", step, why)

    def close(self) -> None:
        try:
            self.sink.close(CLOSE_TIMEOUT_S)
        except Exception:
            logger.exception("otel-moe: closing the sink failed")
        if self.layout_drops or self.failed_steps:
            logger.warning("otel-moe: exporter: %d steps received, %d dropped at layout, %d failed in the sink",
                           self.steps, self.layout_drops, self.failed_steps)


def run(spec_json: str) -> int:
    spec = json.loads(spec_json)
    _name_process(spec)
    never_preempt_on_wakeup()  # a step's message must not hand vLLM's core to us
    leave_cpus(spec["engine_cpus"])  # first: the threads the sinks start inherit it
    # Ctrl-C reaches the whole process group: the worker decides when to stop (it
    # closes the socket or asks), so the last steps it sends are not lost.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # flush (finally below), then exit
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"(otel-moe exporter pid={os.getpid()}) %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    sinks = SinkSpec(tuple(spec["destinations"]), spec["mode"], spec.get("metrics", DEFAULT_METRICS))
    receiver = Receiver(spec, open_sinks(sinks, spec["resource"]))
    try:
        receiver.run()
    except WorkerGone:
        pass
    finally:
        receiver.close()
    return 0


def _name_process(spec: dict) -> None:
    """`ps` shows ``otel-moe exporter`` and whom it serves."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(f"otel-moe exporter (vLLM pid {spec['parent_pid']}, dp {spec['dp_rank']})")

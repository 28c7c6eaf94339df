"""The engine thread's part of recording: once per real step, snapshot and hand off.

Everything after the snapshot (layout, records, sinks, export) runs in the
worker's exporter process (otel_moe.exporter). Here, per step: a live-control
check (one ``stat``), the scheduler's per-request numbers copied into a small
message by C-level list operations, a device copy into the shared ring, and a
non-blocking hand-off. When the ring or the hand-off queue is full the step is
dropped and counted, never waited for.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from otel_moe.capture import RoutingBuffers, not_captured
from otel_moe.config import Config
from otel_moe.control import ControlState, ControlWatcher
from otel_moe.exporter.link import ExporterLink
from otel_moe.ring import BEGIN, STEP
from otel_moe.snapshot import Snapshotter

logger = logging.getLogger("vllm.otel_moe")
DROP_WARNING_INTERVAL_S = 60.0


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
        self.snapshotter = Snapshotter(buffers, exporter.ring.tensor(), exporter.space)
        if buffers.ids.is_cuda and not exporter.ring.pinned:
            logger.warning("otel-moe: the shared ring could not be page-locked; device copies will be synchronous")
        self._apply(control.state if control else ControlState.from_config(config))
        self.steps = 0
        self.dropped_steps = 0
        self.dropped_tokens = 0
        self.failed_steps = 0
        self._checked_capture = False
        self._last_drop_warning = 0.0
        self._closed = False
        self._live: set[str] = set()  # internal ids of requests vLLM is running
        # Live requests that live control left recorded only in part: they were
        # live when recording stopped or switched layers or mode, or began while it was off.
        self._partial: set[str] = set()

    def begin_step(self, scheduler_output: Any) -> Optional[int]:
        """Before every real step's forward, tokens or not: pass on finishes, take
        a live-control change, pass on new requests. Returns the index the step
        will be recorded under (``on_step`` follows), or ``None``: not recorded."""
        if not self.exporter.alive:
            return None
        finished = list(getattr(scheduler_output, "finished_req_ids", None) or ())
        partial = [r for r in finished if r in self._partial]
        if finished:
            self._live.difference_update(finished)
            self._partial.difference_update(finished)
        if self.control is not None and self.control.poll():  # after finishes: those requests are whole
            self._partial.update(self._live)
            self._apply(self.control.state)
        new = [(r.req_id, _prompt_len(r)) for r in scheduler_output.scheduled_new_reqs]
        if new:  # learned while paused too: recording may resume mid-request
            self._live.update(r for r, _ in new)
        if finished or new:
            self.exporter.send((BEGIN, finished, partial, new))
        if not self.recording:
            self._partial.update(r for r, _ in new)
            return None
        return self.steps if scheduler_output.total_num_scheduled_tokens else None

    def _apply(self, state: ControlState) -> None:
        """Take a (validated) control state: which layers, which form, on or off."""
        self.recording = state.recording
        self.counts_only = state.mode == "counts"
        self.layers = [layer for layer in self.buffers.layers if state.layers.wants(layer)]
        columns = [self.buffers.layers.index(layer) for layer in self.layers]
        everything = columns == list(range(len(self.buffers.layers)))
        self._columns = None if everything else torch.tensor(columns, device=self.buffers.ids.device)
        self.control_version = self.control.version if self.control else 0

    def on_step(self, scheduler_output: Any, batch_order: list[str], start_ns: int, end_ns: int) -> None:
        """Called after the forward of each step ``begin_step`` gave an index."""
        step = self.steps  # every recorded step gets an index, so drops leave visible gaps
        self.steps += 1
        n = scheduler_output.total_num_scheduled_tokens
        if not self._checked_capture:
            self._check_capture(n)
        self.exporter.free_finished_steps()
        snapshot = None
        if n <= self.buffers.max_tokens:
            snapshot = self.snapshotter.take(n, self._columns, self.counts_only)
        if snapshot is None:
            self._drop(n, "the shared ring is full")
            return
        # Per-request numbers in batch order, by C-level map/zip: no Python loop per request.
        cached = scheduler_output.scheduled_cached_reqs
        first = dict(zip(cached.req_ids, cached.num_computed_tokens))
        first.update((r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs)
        message = (STEP, snapshot.offset, snapshot.arrays, step, start_ns, end_ns, n, self.layers, self.counts_only,
                   self.control_version, self.dropped_steps, self.dropped_tokens, batch_order,
                   list(map(scheduler_output.num_scheduled_tokens.get, batch_order)), list(map(first.get, batch_order)))
        if not self.exporter.send(message, snapshot.event):
            self.exporter.space.unreserve_newest()
            self._drop(n, "the hand-off queue is full")

    def _check_capture(self, n: int) -> None:
        # One host sync, on the first real step only: a layer whose rows were
        # never written means its MoE kernel routes without calling the router.
        self._checked_capture = True
        never_written = not_captured(self.buffers.ids.dtype)
        missing = (self.buffers.ids[:n] == never_written).all(dim=2).all(dim=0).tolist()
        lost = [layer for layer, m in zip(self.buffers.layers, missing) if m]
        if lost:
            logger.error("otel-moe: no routing captured for layers %s (monolithic MoE kernel?)", lost)

    def _drop(self, tokens: int, why: str) -> None:
        self.dropped_steps += 1
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
        exited = self.exporter.close(timeout_s)
        if not exited:
            logger.warning("otel-moe: the exporter is still flushing after %.1f s; it finishes on its own", timeout_s)
        if self.dropped_steps or self.failed_steps or self.exporter.dropped_messages:
            logger.warning(
                "otel-moe: %d steps recorded, %d dropped (%d tokens), %d failed, %d messages dropped",
                self.steps, self.dropped_steps, self.dropped_tokens, self.failed_steps,
                self.exporter.dropped_messages,
            )


def _prompt_len(new_request: Any) -> int:
    if new_request.prompt_token_ids is not None:
        return len(new_request.prompt_token_ids)
    embeds = getattr(new_request, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0

"""Hands step snapshots from the engine thread to a sink on a background thread.

The engine thread only snapshots and enqueues; a bounded queue sits between
the two, and when it is full the step is dropped and counted, never waited for.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Optional

import torch

from otel_moe.capture import NOT_CAPTURED, RoutingBuffers
from otel_moe.config import MODES, Config
from otel_moe.control import ControlState, ControlWatcher
from otel_moe.sinks import Sink
from otel_moe.snapshot import Snapshotter
from otel_moe.step import LayoutError, RequestTracker, StepInputs, StepRecord, external_request_id

logger = logging.getLogger("vllm.otel_moe")
_STOP = object()
DROP_WARNING_INTERVAL_S = 60.0
IDLE_FLUSH_S = 1.0  # a sink with pending output flushes after this long without steps


class _Finished(list):
    """Request ids vLLM finished, as a queue item; ``partial``: those of them
    that live control left recorded only in part."""

    def __init__(self, request_ids, partial: set) -> None:
        super().__init__(request_ids)
        self.partial = partial


def yield_gil() -> None:
    """Let another thread run now.

    The engine's loop is Python too: a sink thread that held the GIL until the
    interpreter's 5 ms switch interval forced it out would stall the engine on
    every step, so the sink thread gives the GIL up between pieces of work.
    """
    time.sleep(0)


class StepRecorder:
    def __init__(
        self,
        buffers: RoutingBuffers,
        config: Config,
        sink: Sink,
        dp_rank: int = 0,
        randomized_request_ids: bool = True,
        control: Optional[ControlWatcher] = None,
        run_id: str = "",
        model_moe_layers: Optional[list[int]] = None,
    ) -> None:
        self.buffers = buffers
        self.run_id = run_id
        self.model_moe_layers = model_moe_layers or list(buffers.layers)  # recorded or not
        self.sink = sink
        self.dp_rank = dp_rank
        self.randomized_request_ids = randomized_request_ids
        self.tracker = RequestTracker()
        self.control = control
        # Under live control either form may be asked for later: room for both.
        self.snapshotter = Snapshotter(buffers, MODES if control else (config.mode,))
        self._apply(control.state if control else ControlState.from_config(config))
        self.queue: "queue.Queue[Any]" = queue.Queue(maxsize=config.queue_steps)
        self.steps = 0
        self.dropped_steps = 0
        self.dropped_tokens = 0
        self.failed_steps = 0
        self._checked_capture = False
        self._last_drop_warning = 0.0
        self._closing: Optional[float] = None  # deadline, once close() began
        self._external_ids: dict[str, str] = {}  # internal -> user's request id, while live
        # Live requests that live control left recorded only in part: they were
        # live when recording stopped or switched layers or mode, or began while
        # it was off. Engine thread only.
        self._partial: set[str] = set()
        self._thread = threading.Thread(target=self._drain, name="otel-moe-sink", daemon=True)
        self._thread.start()

    # ---- engine thread -------------------------------------------------
    def begin_step(self, scheduler_output: Any) -> Optional[int]:
        """Before every real step's forward, tokens or not: pass on finishes, take
        a live-control change, learn new requests. Returns the index the step
        will be recorded under (``on_step`` follows), or ``None``: not recorded."""
        self.on_finished(scheduler_output)  # before a change: requests finished by now are whole
        if self.control is not None and self.control.poll():
            self._partial.update(self.tracker.live())
            self._apply(self.control.state)
        began = self.tracker.learn(scheduler_output.scheduled_new_reqs)  # recording may resume mid-request
        if not self.recording:
            self._partial.update(began)
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
        """Called after the forward of each step ``begin_step`` gave an index.

        Only cheap work here: copy what the layout needs, start the snapshot,
        enqueue. The layout and everything after it happen on the sink's thread.
        """
        step = self.steps  # every recorded step gets an index, so drops leave visible gaps
        self.steps += 1
        n = scheduler_output.total_num_scheduled_tokens
        inputs = StepInputs.take(scheduler_output, batch_order)
        if not self._checked_capture:
            self._check_capture(n)
        snapshot = None
        if n <= self.buffers.max_tokens:
            snapshot = self.snapshotter.take(n, self._columns, self.counts_only)
        if snapshot is None:
            self._drop(n, "no free snapshot slot")
            return
        item = (step, inputs, snapshot, start_ns, end_ns, self.dropped_steps, self.dropped_tokens,
                self.layers, self.control_version)
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            if snapshot.release is not None:
                snapshot.release()
            self._drop(n, "queue full")

    def on_finished(self, scheduler_output: Any) -> None:
        """Pass on the requests vLLM finished (also on steps with no tokens)."""
        finished = getattr(scheduler_output, "finished_req_ids", None)
        if finished:
            partial = self._partial.intersection(finished)
            self._partial.difference_update(finished)
            try:
                self.queue.put_nowait(_Finished(finished, partial))
            except queue.Full:
                # Forget them here (single dict/set operations: safe beside the sink's thread);
                # their moe.request spans come out when evicted or at close.
                self.tracker.forget(finished)
                for request_id in finished:
                    self._external_ids.pop(request_id, None)

    def _check_capture(self, n: int) -> None:
        # One host sync, on the first real step only: a layer whose rows were
        # never written means its MoE kernel routes without calling the router.
        self._checked_capture = True
        missing = (self.buffers.ids[:n] == NOT_CAPTURED).all(dim=2).all(dim=0).tolist()
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

    # ---- background thread --------------------------------------------
    def _drain(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=IDLE_FLUSH_S)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._close_sink()
                return
            try:
                if item is None:
                    self.sink.idle()
                elif isinstance(item, _Finished):
                    self._finish(item)
                else:
                    record = self._record(*item)
                    if record is not None:
                        yield_gil()
                        self.sink.write(record)
            except Exception:  # a sink problem must never reach the engine
                self.failed_steps += 1
                if self.failed_steps == 1:
                    logger.exception("otel-moe: writing a step failed; later failures are only counted")
            yield_gil()

    def _finish(self, finished: _Finished) -> None:
        self.tracker.forget(finished)
        external = {r: self._external(r, forget=True) for r in finished}
        self.sink.finish(list(external.values()), {external[r] for r in finished.partial})

    def _external(self, internal_id: str, forget: bool = False) -> str:
        if forget:
            return self._external_ids.pop(internal_id, None) or external_request_id(internal_id, self.randomized_request_ids)
        external = self._external_ids.get(internal_id)
        if external is None:
            external = self._external_ids[internal_id] = external_request_id(internal_id, self.randomized_request_ids)
        return external

    def _record(self, step, inputs, snapshot, start_ns, end_ns, dropped_steps, dropped_tokens,
                layers, control_version) -> Optional[StepRecord]:
        try:
            layout = self.tracker.layout(inputs)
        except (LayoutError, KeyError) as err:
            if snapshot.release is not None:
                snapshot.release()
            self._drop(inputs.total, f"layout: {err}")
            return None
        ids, weights, counts = snapshot.to_numpy()
        return StepRecord(
            step=step,
            start_ns=start_ns,
            end_ns=end_ns,
            layers=layers,
            top_k=self.buffers.top_k,
            num_experts=self.buffers.num_experts,
            request_ids=[self._external(r) for r in layout.internal_ids],
            request_tokens=layout.request_tokens,
            positions=layout.positions,
            prompt_lens=layout.prompt_lens,
            ids=ids,
            weights=weights,
            counts=counts,
            dp_rank=self.dp_rank,
            dropped_steps=dropped_steps,
            dropped_tokens=dropped_tokens,
            control_version=control_version,
        )

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush within a bounded time; never hangs the engine's exit."""
        if self._closing is not None:
            return
        self._closing = time.monotonic() + timeout_s
        try:
            self.queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(max(0.0, self._closing - time.monotonic()))
        if self._thread.is_alive():
            logger.warning("otel-moe: the sink did not finish within %.1f s; pending steps are lost", timeout_s)

    def _close_sink(self) -> None:
        # On the sink's own thread, so the sink is never used by two threads.
        try:
            self.sink.close(max(0.1, self._closing - time.monotonic()))
        except Exception:
            logger.exception("otel-moe: closing the sink failed")
        if self.dropped_steps or self.failed_steps:
            logger.warning(
                "otel-moe: %d steps recorded, %d dropped (%d tokens), %d failed in the sink",
                self.steps, self.dropped_steps, self.dropped_tokens, self.failed_steps,
            )

"""Routing capture buffers: the only otel-moe code that runs inside the model's forward.

One ``RoutingBuffers`` per worker holds, for every logged MoE layer, the expert
ids and weights the router chose for each token of the current forward.

Invariants:
  - Shape is fixed when the model is loaded, before torch.compile traces and
    before CUDA graphs are captured: ``ids`` is ``(max_tokens, num_layers, top_k)``
    in the narrowest type that holds an expert id (uint8 up to 256 experts, else
    int16), ``weights`` the same in float16, on the model's device: the copy in
    the forward narrows them, and every later copy moves a quarter (ids) and a
    half (weights) of the bytes. Row ``t`` is the ``t``-th token of the
    forward's batch, so ``ids[:n]`` is contiguous and one copy takes a whole step.
  - The forward only ever does ``buffer[:n, slot].copy_(x[:n])``: a tensor write,
    no host sync, no Python side effect, so it is traced by Dynamo and recorded
    into CUDA graphs, and graph replays keep writing the same addresses.
  - Every forward overwrites rows ``0..n-1`` of each captured layer, padding rows
    included. Which rows are real tokens is decided on the host, once per engine
    step, from the scheduler's output (see ``step.py``); dummy, profile and
    warm-up forwards are simply never read.
  - Ids are written before any EPLB logical->physical mapping where vLLM offers
    the ``set_capture_fn`` hook (vLLM >= 0.26).
  - Each form is there only when it may be recorded (``tokens``: the engine's mode
    is tokens, or live control may switch to it; ``enable_counts``: counts, or
    live control), so the forward writes nothing that is never read: counts mode
    alone writes one int64 index per layer, tokens mode alone ids and weights.
  - Counts mode keeps per-layer expert counters on the device (``counts``, int64,
    ``(num_layers, num_experts + 1)``; columns ``0..num_experts-1`` are read, the
    last one takes what a layer never captured holds). The forward also writes
    each layer's ids, widened, into ``index`` (int64, ``(num_layers, max_tokens *
    top_k)``, layer-major), which is what ``scatter_add_`` wants. ``accumulate(n)``
    adds the first ``n`` tokens of ``index`` into the counters: called from the
    engine thread after a real step's forward, with the host's count of that step's
    real tokens, so padding, dummy, profile and warm-up rows never count. It is one
    kernel launched from one Python call, no host sync: on a GPU vLLM's engine
    thread is busy nearly all of a step, so each call it makes costs throughput.
    The counters are read (and zeroed) only once per window of steps.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

MAX_CACHED_VIEWS = 4096  # counts mode: token counts whose views are kept


def ids_dtype(num_experts: int) -> torch.dtype:
    return torch.uint8 if num_experts <= 256 else torch.int16


def not_captured(dtype: torch.dtype) -> int:
    """The ids buffer starts filled with this: a layer never written shows it
    (a real row never repeats one expert top_k times)."""
    return torch.iinfo(dtype).max


class RoutingBuffers:
    def __init__(
        self,
        layers: Sequence[int],
        max_tokens: int,
        top_k: int,
        num_experts: int,
        device: torch.device | str,
        tokens: bool = True,
    ) -> None:
        self.layers = list(layers)  # decoder layer index of each slot
        self.max_tokens = max_tokens
        self.top_k = top_k
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.ids: Optional[torch.Tensor] = None  # tokens mode
        self.weights: Optional[torch.Tensor] = None
        if tokens:
            shape = (max_tokens, len(self.layers), top_k)
            dtype = ids_dtype(num_experts)
            self.ids = torch.full(shape, not_captured(dtype), dtype=dtype, device=device)
            self.weights = torch.zeros(shape, dtype=torch.float16, device=device)
        self.counts: Optional[torch.Tensor] = None  # counts mode (enable_counts)
        self.index: Optional[torch.Tensor] = None

    def enable_counts(self) -> None:
        """Before the forward is traced or captured: from then on it fills ``index`` too."""
        layers, device = len(self.layers), self.device
        self.counts = torch.zeros((layers, self.num_experts + 1), dtype=torch.int64, device=device)
        # A layer never captured keeps this id: it lands in the column nobody reads.
        self.index = torch.full((layers, self.max_tokens * self.top_k), self.num_experts, dtype=torch.int64,
                                device=device)
        self._ones = torch.ones(1, dtype=torch.int64, device=device).expand(layers, self.max_tokens * self.top_k)
        self._first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # tokens -> (index, ones) views

    def accumulate(self, num_tokens: int) -> None:
        """Add the expert ids of the first ``num_tokens`` tokens to the device counters."""
        views = self._first.get(num_tokens)
        if views is None:  # the views of each token count are made once (a bounded few)
            if len(self._first) >= MAX_CACHED_VIEWS:
                self._first.clear()
            width = num_tokens * self.top_k
            views = self._first[num_tokens] = (self.index[:, :width], self._ones[:, :width])
        self.counts.scatter_add_(1, *views)

    def layers_never_written(self, num_tokens: int) -> list[int]:
        """The layers whose first ``num_tokens`` rows still hold what they were filled
        with (one host sync: once, after the first real step)."""
        if self.ids is not None:
            unwritten = (self.ids[:num_tokens] == not_captured(self.ids.dtype)).all(dim=2).all(dim=0)
        else:
            unwritten = (self.index[:, : num_tokens * self.top_k] == self.num_experts).all(dim=1)
        return [layer for layer, never in zip(self.layers, unwritten.tolist()) if never]

    def ids_writer(self, slot: int) -> Callable[[torch.Tensor], None]:
        max_tokens, top_k = self.max_tokens, self.top_k
        if self.index is None:
            return _row_writer(self.ids[:, slot], max_tokens)
        index = self.index[slot]
        if self.ids is None:
            def write_index(values: torch.Tensor) -> None:
                n = min(values.shape[0], max_tokens)
                index[: n * top_k].copy_(values[:n].reshape(-1))

            return write_index
        ids = self.ids[:, slot]

        def write(values: torch.Tensor) -> None:
            n = min(values.shape[0], max_tokens)
            ids[:n].copy_(values[:n])
            index[: n * top_k].copy_(values[:n].reshape(-1))

        return write

    def weights_writer(self, slot: int) -> Optional[Callable[[torch.Tensor], None]]:
        """``None`` when tokens are never recorded: no weights are kept."""
        return None if self.weights is None else _row_writer(self.weights[:, slot], self.max_tokens)


def _row_writer(target: torch.Tensor, max_tokens: int) -> Callable[[torch.Tensor], None]:
    def write(values: torch.Tensor) -> None:
        n = min(values.shape[0], max_tokens)
        target[:n].copy_(values[:n])

    return write

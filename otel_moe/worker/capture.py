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
  - The forward only ever does ``buffer[:n, slot].copy_(x[:n])`` and the masked
    add into the counters below: tensor writes, no host sync, no Python side
    effect, so they are traced by Dynamo and recorded into CUDA graphs, and graph
    replays keep writing the same addresses.
  - Every forward overwrites rows ``0..n-1`` of each captured layer, padding rows
    included. Which rows are real tokens is decided on the host, once per engine
    step, from the scheduler's output (see ``step.py``); dummy, profile and
    warm-up forwards are simply never read.
  - Ids are written before any EPLB logical->physical mapping where vLLM offers
    the ``set_capture_fn`` hook (vLLM >= 0.26).
  - Each form is there only when it may be recorded (``tokens``: the engine's mode
    is tokens, or live control may switch to it; ``enable_counts``: counts, or
    live control), so the forward writes nothing that is never read: counts mode
    alone only adds to its counters, tokens mode alone writes ids and weights.
  - Counts mode keeps per-layer expert counters on the device (``counts``, int64,
    ``(num_layers, num_experts + 1)``; columns ``0..num_experts-1`` are read, the
    last one takes every row that must not count). They are zeroed when a window of
    steps opens and read once when it closes. Who adds to them depends on whether
    the ids are kept too:
      - counts alone (no ``ids``): the forward adds each layer's ids itself
        (``index_add_``, which CUDA graphs replay), masked by ``real_tokens``, a
        device scalar: rows at or past it (CUDA-graph padding) go to the last column.
        The engine thread sets it before each recorded step's forward, with a call
        only when the step's token count differs from the last one it set (none in a
        run of full decode steps: on a GPU vLLM's engine thread is busy nearly all of
        a step, so each call it makes costs throughput), and to 0 before any forward
        that is not a real step (dummy, profile, warm-up, capture runs), so those add
        nothing.
      - with ``ids`` (live control, which may switch between the forms): the forward
        writes the ids alone, and the engine thread adds a counted step's real rows
        to the counters after its forward (``count_rows``: three kernels a step, on
        the same stream; an id no router wrote goes to the last column). A layer's
        forward is then tokens mode's two copies, recording or paused: counting in it
        would add ~3 kernels to every layer of every step CUDA graphs replay, paused
        steps included.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


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
        self.real_tokens: Optional[torch.Tensor] = None
        self._real_tokens_set = 0  # the value real_tokens was last given (host side: no read)

    def enable_counts(self) -> None:
        """Before the forward is traced or captured (and after ``ids``, if any, exist):
        counts mode may be recorded."""
        layers, device = len(self.layers), self.device
        self.counts = torch.zeros((layers, self.num_experts + 1), dtype=torch.int64, device=device)
        if self.ids is None:  # the forward counts
            self.real_tokens = torch.zeros(1, dtype=torch.int64, device=device)  # 0: nothing counts
            self._rows = torch.arange(self.max_tokens, dtype=torch.int64, device=device).unsqueeze(1)
            self._ones = torch.ones(self.max_tokens * self.top_k, dtype=torch.int64, device=device)
        else:  # count_rows counts, from the ids: layer l's expert e is column l * (E + 1) + e of the flat counters
            # int32: adding it to the uint8/int16 ids makes the index in one call
            self._column_of_layer = torch.arange(layers, dtype=torch.int32, device=device).view(1, layers, 1) * (
                self.num_experts + 1)
            # one, as many times as a step has ids (stride 0: no memory)
            self._ones = torch.ones(1, dtype=torch.int64, device=device).expand(self.max_tokens * layers * self.top_k)

    def set_real_tokens(self, num_tokens: int) -> None:
        """The next forwards count their first ``num_tokens`` rows (0: none); nothing
        to do where the forward does not count."""
        if self.real_tokens is not None and num_tokens != self._real_tokens_set:
            self.real_tokens.fill_(num_tokens)
            self._real_tokens_set = num_tokens

    def count_rows(self, num_tokens: int) -> None:
        """After a counted step's forward: add its first ``num_tokens`` rows of ids to
        the counters (nothing to do where the forward counted them itself)."""
        if self.real_tokens is not None:
            return
        n = min(num_tokens, self.max_tokens)
        # A row no router wrote holds not_captured(): clamped into the spare column, as an index
        # out of range would stop the engine on a GPU (a device assert). (At exactly 256 experts
        # uint8's 255 is an expert: layers_never_written tells.)
        ids = self.ids[:n].clamp(0, min(self.num_experts, not_captured(self.ids.dtype)))
        columns = torch.add(ids, self._column_of_layer).view(-1)  # int32, from uint8 or int16
        self.counts.view(-1).index_add_(0, columns, self._ones[: columns.numel()])

    def restart_counts(self) -> None:
        self.counts.zero_()

    def layers_never_written(self, num_tokens: int) -> list[int]:
        """The layers whose first ``num_tokens`` rows still hold what they were filled
        with (one host sync: once, after the first real step's forward; counts alone
        can tell only from counters the step has added to)."""
        if self.ids is not None:
            unwritten = (self.ids[:num_tokens] == not_captured(self.ids.dtype)).all(dim=2).all(dim=0)
        else:
            unwritten = self.counts[:, : self.num_experts].sum(dim=1) == 0
        return [layer for layer, never in zip(self.layers, unwritten.tolist()) if never]

    def ids_writer(self, slot: int) -> Callable[[torch.Tensor], None]:
        """What a layer's forward does with its router's ids: keep them, or (counts
        alone) count them."""
        if self.ids is not None:
            return _row_writer(self.ids[:, slot], self.max_tokens)
        return None if self.counts is None else self._counter(slot)

    def _counter(self, slot: int) -> Callable[[torch.Tensor], None]:
        counts, real_tokens, rows, ones = self.counts[slot], self.real_tokens, self._rows, self._ones
        max_tokens, top_k, spare = self.max_tokens, self.top_k, self.num_experts

        def count(values: torch.Tensor) -> None:
            n = min(values.shape[0], max_tokens)
            counted = torch.where(rows[:n] < real_tokens, values[:n], spare)  # padding -> the spare column
            counts.index_add_(0, counted.reshape(-1), ones[: n * top_k])

        return count

    def weights_writer(self, slot: int) -> Optional[Callable[[torch.Tensor], None]]:
        """``None`` when tokens are never recorded: no weights are kept."""
        return None if self.weights is None else _row_writer(self.weights[:, slot], self.max_tokens)


def _row_writer(target: torch.Tensor, max_tokens: int) -> Callable[[torch.Tensor], None]:
    def write(values: torch.Tensor) -> None:
        n = min(values.shape[0], max_tokens)
        target[:n].copy_(values[:n])

    return write

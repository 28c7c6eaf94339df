"""Step records: which real token of which request each captured row is.

Built in the exporter process once per real engine step from the scheduler's
per-request numbers (a public, stable structure), the order the model runner
laid the batch out in, and the step's bytes in the shared ring. Rows past the
step's real tokens (CUDA-graph padding) never make it here.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import numpy as np


def external_request_id(internal_id: str, internal_suffix: Optional[re.Pattern]) -> str:
    """The id the user sees (``RequestOutput.request_id``, ``gen_ai.request.id``): the
    engine's id less the suffix the engine adds to keep ids unique (the binding says
    which, in the exporter's spec; ``None``: the ids are the users' own)."""
    match = internal_suffix.search(internal_id) if internal_suffix is not None else None
    return internal_id[:match.start()] if match else internal_id


@dataclasses.dataclass
class StepRecord:
    """One engine step's routing, for the real tokens only, in batch order."""

    step: int
    start_ns: int  # wall clock, around the step's model execution
    end_ns: int
    layers: list[int]  # decoder layer index of each column of ids/weights/counts
    top_k: int
    num_experts: int
    request_ids: list[str]  # external ids, in batch order
    request_tokens: np.ndarray  # [R] tokens of each request in this step
    positions: np.ndarray  # [n] position of each token in its request (0-based)
    prompt_lens: np.ndarray  # [R]
    ids: Optional[np.ndarray] = None  # [n, L, K] int32 (tokens mode)
    weights: Optional[np.ndarray] = None  # [n, L, K] float16 as captured, or float32 (tokens mode)
    counts: Optional[np.ndarray] = None  # [L, E] int64 (counts mode)
    dp_rank: int = 0
    dropped_steps: int = 0  # cumulative drops of this process when the step was taken
    dropped_tokens: int = 0
    control_version: int = 0  # changes of live control applied before this step (0: none)
    engine_thread_ns: int = 0  # time recording took vLLM's engine thread before this step, cumulative
    # Counts mode: a record covers a window of steps, step..last_step, and its
    # tokens; it names no requests (their token counts come with per-step records
    # that carry neither ids nor counts).
    last_step: Optional[int] = None
    window_tokens: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        return self.window_tokens if self.window_tokens is not None else int(self.request_tokens.sum())

    @property
    def is_window(self) -> bool:
        return self.last_step is not None

    def token_request_index(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.request_ids)), self.request_tokens)

    def is_prefill(self) -> np.ndarray:
        return self.positions < self.prompt_lens[self.token_request_index()]

    def layer_counts(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """[L, E] tokens routed to each expert (each token counts top_k times); of the
        tokens ``rows`` selects (a boolean mask over tokens) when given (tokens mode)."""
        if self.counts is not None:
            return self.counts
        assert self.ids is not None
        ids = self.ids if rows is None else self.ids[rows]
        num_layers = len(self.layers)
        index = (np.arange(num_layers, dtype=np.int64)[None, :, None] * self.num_experts + ids).ravel()
        return np.bincount(index, minlength=num_layers * self.num_experts).reshape(num_layers, self.num_experts)

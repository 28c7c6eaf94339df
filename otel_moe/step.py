"""Step records: which real token of which request each captured row is.

Built on the host once per real engine step from the scheduler's output (a
public, stable structure) and the order the model runner laid the batch out in.
Rows past the step's real tokens (CUDA-graph padding) never make it here.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Optional

import numpy as np

PREFILL, DECODE = "prefill", "decode"

# vLLM appends "-" + 8 hex chars to every request id it is given, to keep ids
# unique inside the engine (v1/engine/input_processor.py: assign_request_id).
_INTERNAL_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def external_request_id(internal_id: str, randomized: bool = True) -> str:
    """The id the user sees (``RequestOutput.request_id``, ``gen_ai.request.id``)."""
    if randomized and _INTERNAL_SUFFIX.search(internal_id):
        return internal_id[:-9]
    return internal_id


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
    weights: Optional[np.ndarray] = None  # [n, L, K] float32 (tokens mode)
    counts: Optional[np.ndarray] = None  # [L, E] int64 (counts mode)
    dp_rank: int = 0
    dropped_steps: int = 0  # cumulative drops of this process when the step was taken
    dropped_tokens: int = 0
    control_version: int = 0  # changes of live control applied before this step (0: none)

    @property
    def num_tokens(self) -> int:
        return int(self.request_tokens.sum())

    def token_request_index(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.request_ids)), self.request_tokens)

    def is_prefill(self) -> np.ndarray:
        return self.positions < self.prompt_lens[self.token_request_index()]

    def layer_counts(self) -> np.ndarray:
        """[L, E] tokens routed to each expert (each token counts top_k times)."""
        if self.counts is not None:
            return self.counts
        assert self.ids is not None
        num_layers = len(self.layers)
        flat = self.ids.transpose(1, 0, 2).reshape(num_layers, -1).astype(np.int64)
        flat = flat + (np.arange(num_layers, dtype=np.int64) * self.num_experts)[:, None]
        return np.bincount(flat.ravel(), minlength=num_layers * self.num_experts).reshape(
            num_layers, self.num_experts
        )


@dataclasses.dataclass
class StepLayout:
    internal_ids: list[str]
    request_tokens: np.ndarray
    positions: np.ndarray
    prompt_lens: np.ndarray


@dataclasses.dataclass
class StepInputs:
    """What the layout needs from one step, copied on the engine thread (cheap C-level
    copies) so the engine may reuse its objects while the layout is built elsewhere."""

    total: int
    scheduled: dict  # request id -> tokens this step
    batch_order: list  # request ids in batch order
    new: list  # (request id, first position) of newly scheduled requests
    cached_ids: list
    cached_computed: list

    @classmethod
    def take(cls, scheduler_output: Any, batch_order: list) -> "StepInputs":
        cached = scheduler_output.scheduled_cached_reqs
        return cls(
            scheduler_output.total_num_scheduled_tokens,
            dict(scheduler_output.num_scheduled_tokens),
            batch_order,
            [(new.req_id, new.num_computed_tokens) for new in scheduler_output.scheduled_new_reqs],
            list(cached.req_ids),
            list(cached.num_computed_tokens),
        )


class RequestTracker:
    """Prompt length of every live request, learned from the scheduler's output.

    ``learn`` runs on the engine thread for every step, dropped and paused ones
    too (a request's prompt length comes only with its first step); ``layout``
    and ``forget`` run on the sink's thread. Single dict operations: no lock needed.
    """

    def __init__(self) -> None:
        self.prompt_lens: dict[str, int] = {}

    def learn(self, scheduled_new_reqs: Iterable[Any]) -> list[str]:
        """Remember the prompt length of each newly scheduled request; returns their ids."""
        ids = []
        for new in scheduled_new_reqs:
            self.prompt_lens[new.req_id] = _prompt_len(new)
            ids.append(new.req_id)
        return ids

    def live(self) -> list[str]:
        return list(self.prompt_lens)  # one C-level copy: safe beside the sink's thread

    def layout(self, inputs: StepInputs) -> StepLayout:
        starts = dict(zip(inputs.cached_ids, inputs.cached_computed))
        starts.update(inputs.new)
        scheduled = inputs.scheduled
        order = [r for r in inputs.batch_order if scheduled.get(r, 0) > 0]
        tokens = np.fromiter((scheduled[r] for r in order), dtype=np.int64, count=len(order))
        if tokens.sum() != inputs.total:
            raise LayoutError(f"batch order covers {int(tokens.sum())} tokens, the scheduler scheduled {inputs.total}")
        first = np.fromiter((starts[r] for r in order), dtype=np.int64, count=len(order))
        # positions: first[r] + 0..tokens[r]-1 for each request, concatenated
        offsets = np.arange(int(tokens.sum()), dtype=np.int64) - np.repeat(np.cumsum(tokens) - tokens, tokens)
        positions = np.repeat(first, tokens) + offsets
        prompt = np.fromiter((self.prompt_lens.get(r, 0) for r in order), dtype=np.int64, count=len(order))
        return StepLayout(order, tokens, positions, prompt)

    def forget(self, request_ids: Iterable[str]) -> None:
        for req_id in request_ids:
            self.prompt_lens.pop(req_id, None)


class LayoutError(RuntimeError):
    """The runner's batch does not match the scheduler's output: the step is skipped."""


def _prompt_len(new_request: Any) -> int:
    if new_request.prompt_token_ids is not None:
        return len(new_request.prompt_token_ids)
    embeds = getattr(new_request, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0

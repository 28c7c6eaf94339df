"""Exactness of recorded routing against what vLLM computed, as a list of problems.

Used by the tests and by the benchmarks (which check exactness on the GPU too).
`outputs`: {"request_id", "prompt_token_ids", "output_token_ids", "num_cached_tokens"} per request.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable


def computed_tokens(output: dict) -> int:
    """Tokens that went through the model: the prompt less its cached prefix, and every
    generated token but the last, which is sampled and never fed back."""
    return len(output["prompt_token_ids"]) + len(output["output_token_ids"]) - 1 - output.get("num_cached_tokens", 0)


def exactness_problems(records: Iterable[dict], outputs: list[dict], layers: list[int]) -> list[str]:
    by_request = {o["request_id"]: o for o in outputs}
    positions: dict[tuple, list[int]] = defaultdict(list)
    problems = []
    count = 0
    for r in records:
        count += 1
        out = by_request.get(r["request_id"])
        if out is None:
            problems.append(f"record of unknown request {r['request_id']!r}")
            continue
        expected_phase = "prefill" if r["position"] < len(out["prompt_token_ids"]) else "decode"
        if r["phase"] != expected_phase:
            problems.append(f"{r['request_id']}@{r['position']}: phase {r['phase']}, expected {expected_phase}")
        positions[r["request_id"], r["layer"]].append(r["position"])
    expected_count = sum(computed_tokens(o) for o in outputs) * len(layers)
    if count != expected_count:
        problems.append(f"{count} records, expected {expected_count} (computed tokens x layers)")
    for out in outputs:
        first = out.get("num_cached_tokens", 0)
        expected = list(range(first, len(out["prompt_token_ids"]) + len(out["output_token_ids"]) - 1))
        for layer in layers:
            got = sorted(positions[out["request_id"], layer])
            if got != expected:
                problems.append(f"request {out['request_id']} layer {layer}: positions {got[:5]}... "
                                f"({len(got)}), expected {first}..{expected[-1] if expected else None} ({len(expected)})")
    return problems


class StepCoverage:
    """``exactness_problems`` for step spans read one at a time (``read.decode_step``),
    without a record per token per layer: a GPU run's hundreds of millions of records
    would not fit in memory. Each span adds, per request, the interval of positions
    it covers, once for all the layers it carries; ``problems`` then checks that the
    intervals of every request and layer tile exactly the positions it computed, and
    that each position's phase matches the request's prompt length."""

    def __init__(self) -> None:
        self.records = 0
        self._intervals: dict[tuple, list] = defaultdict(list)  # layers -> per span (ids, firsts, tokens, prompt_lens)
        self._shape_problems: list[str] = []

    def add(self, span) -> None:
        layers = tuple(sorted(span.ids))
        if not layers:
            return
        n = span.num_tokens
        for layer in layers:
            if len(span.ids[layer]) != n:
                self._shape_problems.append(f"step {span.step} layer {layer}: {len(span.ids[layer])} rows, {n} tokens")
        self.records += n * len(layers)
        self._intervals[layers].append((span.request_ids, span.first_positions.tolist(), span.request_tokens.tolist(),
                                        span.prompt_lens.tolist()))

    def problems(self, outputs: list[dict], layers: list[int]) -> list[str]:
        by_request = {o["request_id"]: o for o in outputs}
        problems = list(self._shape_problems)
        expected_count = sum(computed_tokens(o) for o in outputs) * len(layers)
        if self.records != expected_count:
            problems.append(f"{self.records} records, expected {expected_count} (computed tokens x layers)")
        covered: dict[tuple, dict[str, list]] = {}  # layers -> request -> [(first, tokens)]
        for group, spans in self._intervals.items():
            per_request = covered[group] = defaultdict(list)
            for request_ids, firsts, tokens, prompt_lens in spans:
                for request_id, first, count, prompt_len in zip(request_ids, firsts, tokens, prompt_lens):
                    out = by_request.get(request_id)
                    if out is None:
                        problems.append(f"records of unknown request {request_id!r}")
                        continue
                    # positions whose phase differs: those between the two prompt lengths
                    lo, hi = sorted((prompt_len, len(out["prompt_token_ids"])))
                    if min(first + count, hi) > max(first, lo):
                        problems.append(f"{request_id}@{first}..{first + count - 1}: prefill up to {prompt_len}, "
                                        f"expected up to {len(out['prompt_token_ids'])}")
                    per_request[request_id].append((first, count))
        for layer in layers:
            groups = [group for group in covered if layer in group]
            for out in outputs:
                first = out.get("num_cached_tokens", 0)
                end = len(out["prompt_token_ids"]) + len(out["output_token_ids"]) - 1
                intervals = sorted(i for group in groups for i in covered[group].get(out["request_id"], ()))
                at = first
                for start, count in intervals:
                    if start != at:
                        break
                    at += count
                else:
                    if at == end:
                        continue
                got = sum(count for _, count in intervals)
                problems.append(f"request {out['request_id']} layer {layer}: positions from "
                                f"{intervals[0][0] if intervals else None} in {len(intervals)} intervals ({got}), "
                                f"expected {first}..{end - 1} ({end - first})")
        return problems

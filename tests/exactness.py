"""The exactness checks every real-engine run must pass, shared by the tests."""
from __future__ import annotations

from collections import defaultdict


def computed_tokens(output: dict) -> int:
    """Tokens that went through the model: prompt (less the cached prefix) and
    every generated token but the last, which is sampled and never fed back."""
    return len(output["prompt_token_ids"]) + len(output["output_token_ids"]) - 1 - output["num_cached_tokens"]


def assert_exact(records: list[dict], outputs: list[dict], layers: list[int], top_k: int, num_experts: int) -> None:
    by_request = {o["request_id"]: o for o in outputs}
    positions = defaultdict(list)
    for r in records:
        assert r["layer"] in layers, r
        out = by_request[r["request_id"]]
        prompt_len = len(out["prompt_token_ids"])
        assert r["phase"] == ("prefill" if r["position"] < prompt_len else "decode"), r
        assert len(r["expert_ids"]) == top_k and len(set(r["expert_ids"])) == top_k, r
        assert all(0 <= e < num_experts for e in r["expert_ids"]), r
        assert len(r["expert_weights"]) == top_k and all(w > 0 for w in r["expert_weights"]), r
        positions[r["request_id"], r["layer"]].append(r["position"])
    assert len(records) == sum(computed_tokens(o) for o in outputs) * len(layers)
    for out in outputs:
        first = out["num_cached_tokens"]
        last = len(out["prompt_token_ids"]) + len(out["output_token_ids"]) - 2
        for layer in layers:
            assert sorted(positions[out["request_id"], layer]) == list(range(first, last + 1)), (
                out["request_id"], layer)

"""The exactness checks every real-engine run must pass (tools.verify), plus
per-record shape checks."""
from __future__ import annotations

from tools.verify import computed_tokens, exactness_problems

__all__ = ["assert_exact", "computed_tokens"]


def assert_exact(records: list[dict], outputs: list[dict], layers: list[int], top_k: int, num_experts: int) -> None:
    for r in records:
        assert r["layer"] in layers, r
        assert len(r["expert_ids"]) == top_k and len(set(r["expert_ids"])) == top_k, r
        assert all(0 <= e < num_experts for e in r["expert_ids"]), r
        assert len(r["expert_weights"]) == top_k and all(w > 0 for w in r["expert_weights"]), r
    assert exactness_problems(records, outputs, layers) == []

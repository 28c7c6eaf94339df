"""A short per-layer text summary of a JSONL routing log (used by ``make demo``)."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np


def jsonl_layer_counts(path: str) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Per layer: expert counts and routed tokens, from tokens- or counts-mode lines."""
    counts: dict[int, np.ndarray] = {}
    tokens: dict[int, int] = defaultdict(int)
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            layer = row["layer"]
            if "counts" in row:
                add = np.asarray(row["counts"], dtype=np.int64)
                tokens[layer] += row["num_tokens"]
            else:
                add = np.bincount(row["expert_ids"], minlength=1)
                tokens[layer] += 1
            have = counts.get(layer, np.zeros(0, dtype=np.int64))
            size = max(len(have), len(add))
            counts[layer] = np.pad(have, (0, size - len(have))) + np.pad(add, (0, size - len(add)))
    return counts, dict(tokens)


def print_jsonl_summary(path: str) -> int:
    counts, tokens = jsonl_layer_counts(path)
    if not counts:
        print(f"{path}: no routing records")
        return 1
    print(f"{path}: {len(counts)} layers")
    print(f"{'layer':>5} {'tokens':>7}  {'top experts (share)':<40} max/mean")
    for layer in sorted(counts):
        c = counts[layer]
        share = c / c.sum()
        top = np.argsort(-c)[:3]
        tops = ", ".join(f"e{e} {share[e]:.0%}" for e in top)
        print(f"{layer:>5} {tokens[layer]:>7}  {tops:<40} {c.max() / c.mean():.2f}")
    return 0

"""RunStats: a step's layers added at once (add_token_layers, the collector's steps) give
exactly what adding them a layer at a time (add_layer) gives."""
from __future__ import annotations

import numpy as np
import pytest

from otel_moe.report.aggregate import RunStats


def steps(num_experts: int, top_k: int, layers: int, seed: int):
    rng = np.random.default_rng(seed)
    for step in range(5):
        requests = int(rng.integers(1, 9))
        tokens = rng.integers(1, 40, requests)
        request_of = np.repeat(np.arange(requests), tokens)
        n = len(request_of)
        positions = np.concatenate([np.arange(t) + int(rng.integers(0, 3000)) for t in tokens])
        prefill = positions < 1500
        ids = np.stack([np.stack([rng.permutation(num_experts)[:top_k] for _ in range(n)]) for _ in range(layers)])
        ids = ids.astype(np.uint8 if num_experts <= 256 else np.int16)
        weights = rng.random((layers, n, top_k)).astype(np.float16)
        yield step, [f"r{step % 3}-{i}" for i in range(requests)], tokens, request_of, positions, prefill, ids, weights


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (60, 4), (256, 8), (300, 8)])
def test_a_step_s_layers_at_once_add_what_they_add_one_by_one(num_experts, top_k):
    layers = [0, 2, 5]
    at_once, one_by_one = RunStats(), RunStats()
    imbalance = {layer: ([], []) for layer in layers}  # each step's max / mean and std / mean, a layer at a time
    for step, request_ids, tokens, request_of, positions, prefill, ids, weights in steps(num_experts, top_k, 3, num_experts):
        counts = [np.bincount(i.ravel().astype(np.int64), minlength=num_experts) for i in ids]
        for layer, c in zip(layers, counts):
            imbalance[layer][0].append(float(c.max() / c.mean()))
            imbalance[layer][1].append(float(c.std() / c.mean()))
        for run in (at_once, one_by_one):
            run.begin_step(step, len(request_of))
            run.add_request_tokens(request_ids, tokens, np.zeros(len(tokens), np.int64))
        rows = at_once.request_rows(request_ids)
        assert at_once.add_token_layers(layers, num_experts, counts, ids, weights, rows, request_of, prefill, positions,
                                        len(request_of))
        rows = one_by_one.request_rows(request_ids)
        for slot, layer in enumerate(layers):
            one_by_one.add_layer(layer, num_experts, counts[slot], ids[slot], weights[slot], rows, request_of, prefill,
                                 positions, len(request_of))
    at_once.finish()
    one_by_one.finish()
    for layer in layers:
        a, b = at_once.layers[layer], one_by_one.layers[layer]
        for name in ("counts", "by_position", "top1_hist", "topk_sum_hist"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert (a.cooccurrence is None) == (b.cooccurrence is None) == (num_experts > 256)
        if a.cooccurrence is not None:
            assert np.array_equal(a.cooccurrence, b.cooccurrence) and a.cooccurrence.sum() > 0
        assert (a.tokens, a.weighted_tokens, a.top1_weight_sum, a.weight_sum) == (b.tokens, b.weighted_tokens,
                                                                                  b.top1_weight_sum, b.weight_sum)
        assert a.max_over_mean.y == b.max_over_mean.y == imbalance[layer][0]
        assert a.cv.y == b.cv.y == imbalance[layer][1]
        assert a.counts.sum() == a.tokens * top_k and a.by_position.sum() == a.tokens * top_k
    assert np.array_equal(at_once.routing.counts, one_by_one.routing.counts) and at_once.routing.counts.sum() > 0
    assert at_once.top_k == one_by_one.top_k == top_k and at_once.modes == one_by_one.modes == {"tokens"}


def test_a_layer_wider_than_the_step_is_left_to_add_layer():
    run = RunStats()
    run.layer(1, 16)  # an earlier step had 16 experts in layer 1
    ids = np.zeros((2, 3, 2), np.uint8)
    ids[:, :, 1] = 1
    assert not run.add_token_layers([0, 1], 8, [np.zeros(8, np.int64)] * 2, ids, np.ones((2, 3, 2), np.float16), None,
                                    np.zeros(3, np.int64), np.zeros(3, bool), np.arange(3), 3)
    assert run.layers[1].counts.sum() == 0 and run.layers[0].counts.sum() == 0  # nothing added

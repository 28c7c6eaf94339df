"""Layouts left out where they repeat the previous step's come back whole on the
exporter's side, through marshal, with requests coming and going and messages lost."""
from __future__ import annotations

import random

import pytest

from otel_moe import ring
from otel_moe.step_layout import ONE_EACH, SAME, LayoutDecoder, LayoutEncoder


def layouts(steps: int, seed: int) -> list[tuple]:
    """(tokens, batch order, tokens per request, running ids, their computed tokens, new) of
    a made-up scheduler: requests join (their prompts in one step), decode, finish; the
    batch order is at times shuffled, at times one request sits a step out."""
    rng = random.Random(seed)
    computed: dict[str, int] = {}
    order: list[str] = []
    result = []
    for step in range(steps):
        for request in [r for r in order if rng.random() < 0.05]:
            order.remove(request)
            del computed[request]
        new = [f"r{step}-{i}" for i in range(rng.choice([0, 0, 0, 1, 3]))]
        cached = list(order)
        if rng.random() < 0.1:
            rng.shuffle(order)
        order += new
        resting = rng.choice(cached) if cached and rng.random() < 0.1 else None
        scheduled = {r: 1 for r in cached if r != resting}
        scheduled.update((r, rng.randint(2, 9)) for r in new)
        running = [r for r in cached if r != resting]
        result.append((sum(scheduled.values()), list(order), scheduled, running, [computed[r] for r in running],
                       [(r, 0) for r in new]))
        for r, n in scheduled.items():
            computed[r] = computed.get(r, 0) + n
    return result


@pytest.mark.parametrize("seed", range(5))
def test_every_layout_that_arrives_is_whole_again_though_others_were_lost(seed):
    encoder, decoder, rng = LayoutEncoder(), LayoutDecoder(), random.Random(100 + seed)
    arrived = 0
    for tokens, order, scheduled, running, computed, new in layouts(400, seed):
        sent = ring.decode(ring.encode(encoder.encode(tokens, order, scheduled, running, computed, new)))
        if rng.random() < 0.1:  # the link had no room: it never reaches the exporter
            encoder.forget()
            continue
        arrived += 1
        assert decoder.decode(sent[1], sent[2], sent[3]) == (order, scheduled, running)
        assert (sent[0], sent[4], sent[5]) == (tokens, computed, new)
    assert arrived > 300


def test_a_run_of_decode_steps_sends_only_the_running_requests_computed_tokens():
    encoder = LayoutEncoder()
    order = [f"r{i}" for i in range(256)]
    first = encoder.encode(256, list(order), dict.fromkeys(order, 1), order, list(range(256)), [])
    second = encoder.encode(256, list(order), dict.fromkeys(order, 1), list(order), list(range(1, 257)), [])
    assert first[1:4] == (order, ONE_EACH, order)
    assert second == (256, SAME, ONE_EACH, SAME, list(range(1, 257)), [])


def test_counts_mode_layouts_go_whole_and_leave_the_previous_one_alone():
    encoder, decoder = LayoutEncoder(), LayoutDecoder()
    order = ["a", "b"]
    decoder.decode(*_fields(encoder.encode(2, order, {"a": 1, "b": 1}, order, [3, 4], [])))
    counts = encoder.encode(2, None, {"a": 1, "b": 1}, order, [4, 5], [])
    assert counts == (2, None, {"a": 1, "b": 1}, order, [4, 5], [])
    assert decoder.decode(*_fields(counts)) == (None, {"a": 1, "b": 1}, order)
    again = encoder.encode(2, list(order), {"a": 1, "b": 1}, list(order), [5, 6], [])
    assert decoder.decode(*_fields(again)) == (order, {"a": 1, "b": 1}, order)


def test_a_layout_referring_to_one_never_read_is_refused():
    encoder = LayoutEncoder()
    encoder.encode(1, ["a"], {"a": 1}, ["a"], [3], [])  # read by no exporter
    with pytest.raises(ValueError, match="never read"):
        LayoutDecoder().decode(*_fields(encoder.encode(1, ["a"], {"a": 1}, ["a"], [4], [])))


def _fields(layout: tuple) -> tuple:
    return layout[1], layout[2], layout[3]

"""Layouts left out where they repeat the previous step's come back whole on the
exporter's side, through marshal, with requests coming and going and messages lost."""
from __future__ import annotations

import random

import pytest

from otel_moe.wire import messages
from otel_moe.wire.step_layout import ONE_EACH, SAME, LayoutDecoder, LayoutEncoder


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
        sent = messages.decode(messages.encode(encoder.encode(tokens, order, scheduled, running, computed, new)))
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


@pytest.mark.parametrize("seed", range(3))
def test_a_counts_window_s_layouts_come_back_whole_with_the_window_s_own_decoder(seed):
    """No batch order; a window's layouts go together, so none is lost alone. A fresh
    encoder and decoder each window: the first layout of each goes whole."""
    steps = layouts(300, seed)
    for window in (steps[i:i + 10] for i in range(0, len(steps), 10)):
        encoder, decoder = LayoutEncoder(), LayoutDecoder()
        sent = [messages.decode(messages.encode(encoder.encode(tokens, None, scheduled, running, computed, new)))
                for tokens, _, scheduled, running, computed, new in window]
        assert sent[0][3] != SAME
        for (tokens, _, scheduled, running, computed, new), layout in zip(window, sent):
            assert decoder.decode(*_fields(layout)) == (None, scheduled, running)
            assert (layout[0], layout[4], layout[5]) == (tokens, computed, new)


def test_a_counts_window_of_decode_steps_sends_only_the_running_requests_computed_tokens():
    encoder, running = LayoutEncoder(), [f"r{i}" for i in range(256)]
    first = encoder.encode(256, None, dict.fromkeys(running, 1), running, list(range(256)), [])
    second = encoder.encode(256, None, dict.fromkeys(running, 1), list(running), list(range(1, 257)), [])
    assert first[1:4] == (None, ONE_EACH, running)
    assert second == (256, None, ONE_EACH, SAME, list(range(1, 257)), [])
    # a new request's prompt: its tokens go as they are
    third = encoder.encode(259, None, {**dict.fromkeys(running, 1), "n": 3}, list(running), list(range(2, 258)), [("n", 0)])
    assert third[2] == {**dict.fromkeys(running, 1), "n": 3} and third[3] == SAME


def test_a_layout_referring_to_one_never_read_is_refused():
    encoder = LayoutEncoder()
    encoder.encode(1, ["a"], {"a": 1}, ["a"], [3], [])  # read by no exporter
    with pytest.raises(ValueError, match="never read"):
        LayoutDecoder().decode(*_fields(encoder.encode(1, ["a"], {"a": 1}, ["a"], [4], [])))


def _fields(layout: tuple) -> tuple:
    return layout[1], layout[2], layout[3]

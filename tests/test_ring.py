"""The shared ring's FIFO space: what is reserved never overlaps what is still held,
and steps freed in order give their bytes back; snapshots lay their arrays out where the
exporter reads them, and (CUDA) their copy mark lands after them."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from otel_moe.wire.messages import NO_MARK, array_bytes, decode, encode
from otel_moe.wire.ring import ALIGN, MARKS, MAX_HELD, FifoSpace, SharedRing, socket_pair
from otel_moe.worker.capture import RoutingBuffers
from otel_moe.worker.snapshot import Snapshotter


def _overlaps(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_reservations_never_overlap_and_all_space_comes_back():
    space = FifoSpace(64 * ALIGN)
    rng = random.Random(0)
    reserved, refused = 0, 0
    for _ in range(5000):
        if space.held and rng.random() < 0.45:
            space.free_oldest(rng.randint(1, 3))
            continue
        size = rng.randint(1, 20 * ALIGN)
        offset = space.reserve(size)
        if offset is None:
            refused += 1
            continue
        reserved += 1
        block = space.held[-1]
        assert block[0] == offset and block[1] - offset >= size and block[1] <= space.capacity
        assert not any(_overlaps(block, other) for other in list(space.held)[:-1])
    assert reserved > 1000 and refused > 0  # both paths were taken
    space.free_oldest(len(space.held))
    assert space.reserve(64 * ALIGN) == 0  # empty again: the whole ring fits


def test_a_full_ring_refuses_until_the_oldest_step_is_freed():
    space = FifoSpace(4 * ALIGN)
    assert [space.reserve(ALIGN) for _ in range(4)] == [0, ALIGN, 2 * ALIGN, 3 * ALIGN]
    assert space.reserve(1) is None
    space.free_oldest(1)
    assert space.reserve(ALIGN) == 0  # wraps into the freed front
    assert space.reserve(1) is None


def test_no_more_than_max_held_reservations_however_small():
    space = FifoSpace(MAX_HELD * 2 * ALIGN)
    assert all(space.reserve(1) is not None for _ in range(MAX_HELD))
    assert space.reserve(1) is None  # room for more bytes, but marks would become ambiguous
    space.free_oldest(1)
    assert space.reserve(1) is not None


def test_a_mark_has_landed_once_the_cell_reached_or_passed_it_within_max_held():
    shared = SharedRing(1 << 12)
    cell = shared.tensor()[shared.nbytes: shared.nbytes + 4].view(torch.int32)
    assert not shared.landed(0) and shared.landed(NO_MARK)  # nothing copied yet
    cell[0] = 0
    assert shared.landed(0) and not shared.landed(1)
    cell[0] = 5
    assert [shared.landed(m) for m in (0, 5, 6, 5 + MAX_HELD - 1)] == [True, True, False, False]
    cell[0] = 2  # wrapped: 4094, 4095, 0, 1, 2 landed; 3 not yet
    assert [shared.landed(m % MARKS) for m in (MARKS - 2, MARKS - 1, 0, 2, 3)] == [True, True, True, True, False]


def test_messages_keep_their_boundaries_and_values():
    ours, theirs = socket_pair()
    messages = [(2, 0, [("|u1", [3, 2, 4])], 7, ["a-1", "b"], [1, None], True), (3,)]
    for message in messages:
        ours.send(encode(message))
    assert [decode(theirs.recv(1 << 16)) for _ in messages] == [
        (2, 0, [("|u1", [3, 2, 4])], 7, ["a-1", "b"], [1, None], True), (3,)]


def test_snapshot_lays_narrow_arrays_out_where_the_exporter_reads_them():
    buffers = RoutingBuffers([0, 2, 5], max_tokens=16, top_k=2, num_experts=8, device="cpu")
    assert buffers.ids.dtype == torch.uint8 and buffers.weights.dtype == torch.float16
    buffers.enable_counts()
    ids = torch.randint(0, 8, (5, 3, 2), dtype=torch.uint8)
    for real_tokens in (3, 5):  # two steps' forwards of 5 rows: 3 of them real, then all 5
        for slot in range(3):  # as the routers do in the forward
            buffers.ids_writer(slot)(ids[:, slot].to(torch.int32))
        buffers.count_rows(real_tokens)  # as the recorder does after a counted step's forward
    buffers.weights[:5] = torch.rand(5, 3, 2, dtype=torch.float16)
    shared = SharedRing(1 << 16)
    snapshotter = Snapshotter(buffers, shared, FifoSpace(1 << 16))
    columns = torch.tensor([0, 2])
    tokens = snapshotter.take_tokens(5, columns)
    counts = snapshotter.take_counts(None)
    starts = array_bytes(tokens.arrays)
    got_ids = shared.array(tokens.offset + starts[0], np.dtype(tokens.arrays[0][0]), tuple(tokens.arrays[0][1]))
    got_weights = shared.array(tokens.offset + starts[1], np.dtype(tokens.arrays[1][0]), tuple(tokens.arrays[1][1]))
    assert np.array_equal(got_ids, ids[:, [0, 2]].numpy())
    assert np.array_equal(got_weights, buffers.weights[:5, [0, 2]].numpy())
    got_counts = shared.array(counts.offset, np.dtype(counts.arrays[0][0]), tuple(counts.arrays[0][1]))
    expected = np.stack([np.bincount(np.concatenate([ids[:3, c].ravel(), ids[:, c].ravel()]), minlength=8)
                         for c in range(3)])
    assert np.array_equal(got_counts, expected) and got_counts.sum() == (3 + 5) * 3 * 2


def test_every_step_of_one_token_count_copies_what_its_forward_wrote():
    # The layout of each token count is made once: later steps must still copy their own rows.
    buffers = RoutingBuffers([0, 1], max_tokens=8, top_k=2, num_experts=8, device="cpu")
    shared = SharedRing(1 << 16)
    space = FifoSpace(1 << 16)
    snapshotter = Snapshotter(buffers, shared, space)
    for n, value in ((4, 3), (6, 5), (4, 7)):
        for slot in range(2):
            buffers.ids_writer(slot)(torch.full((n, 2), value + slot))
            buffers.weights_writer(slot)(torch.full((n, 2), value / 10))
        snapshot = snapshotter.take_tokens(n, None)
        starts = array_bytes(snapshot.arrays)
        assert snapshot.arrays == [("|u1", [n, 2, 2]), ("<f2", [n, 2, 2])]
        got_ids = shared.array(snapshot.offset + starts[0], np.uint8, (n, 2, 2))
        got_weights = shared.array(snapshot.offset + starts[1], np.float16, (n, 2, 2))
        assert np.array_equal(got_ids[:, 0], np.full((n, 2), value)) and np.array_equal(got_ids[:, 1], np.full((n, 2), value + 1))
        assert np.array_equal(got_weights, np.full((n, 2, 2), np.float16(value / 10)))
        space.free_oldest(1)


def test_a_full_ring_reads_the_acknowledgements_before_it_drops_a_step():
    buffers = RoutingBuffers([0], max_tokens=4, top_k=2, num_experts=8, device="cpu")
    space = FifoSpace(ALIGN)  # one step of 4 tokens (8 + 16 bytes) at a time
    calls = []

    def read_acknowledgements():  # the exporter finished the oldest step
        calls.append("read")
        space.free_oldest(1)

    snapshotter = Snapshotter(buffers, SharedRing(ALIGN), space, on_full=read_acknowledgements)
    assert snapshotter.take_tokens(4, None) is not None and calls == []  # room: nothing read
    assert snapshotter.take_tokens(4, None) is not None and calls == ["read"]
    snapshotter.on_full = lambda: calls.append("nothing finished")
    assert snapshotter.take_tokens(4, None) is None and calls == ["read", "nothing finished"]  # dropped


def test_counts_alone_keep_no_ids_or_weights_and_still_see_a_layer_never_written():
    buffers = RoutingBuffers([0, 1], max_tokens=4, top_k=2, num_experts=8, device="cpu", tokens=False)
    buffers.enable_counts()
    assert buffers.ids is None and buffers.weights is None and buffers.weights_writer(0) is None
    buffers.set_real_tokens(3)
    buffers.ids_writer(0)(torch.tensor([[1, 2]] * 4))  # layer 1's router never writes
    assert buffers.layers_never_written(3) == [1]
    assert buffers.counts[0, 1] == 3 and buffers.counts[0, 2] == 3 and int(buffers.counts[:, :8].sum()) == 6


def test_only_the_real_rows_of_real_steps_count():
    buffers = RoutingBuffers([0], max_tokens=4, top_k=2, num_experts=60, device="cpu", tokens=False)
    buffers.enable_counts()
    count = buffers.ids_writer(0)
    count(torch.tensor([[5, 6]] * 4))  # before any real step (profile, warm-up): nothing counts
    buffers.set_real_tokens(2)
    count(torch.tensor([[1, 2]] * 4))  # a step of 2 real tokens, padded to 4 rows
    count(torch.tensor([[1, 3]] * 3))  # the next step of 2, padded to 3
    buffers.set_real_tokens(0)
    count(torch.tensor([[7, 8]] * 4))  # a dummy run between steps
    expected = torch.zeros(61, dtype=torch.int64)
    expected[[1, 2, 3]] = torch.tensor([4, 2, 2])
    expected[60] = (4 + 2 + 1 + 4) * 2  # every row that does not count lands in the column nobody reads
    assert torch.equal(buffers.counts[0], expected)
    buffers.restart_counts()
    assert int(buffers.counts.sum()) == 0


def test_counts_of_more_than_256_experts():
    buffers = RoutingBuffers([0], max_tokens=4, top_k=2, num_experts=300, device="cpu", tokens=False)
    buffers.enable_counts()
    buffers.set_real_tokens(2)  # the third token is padding
    buffers.ids_writer(0)(torch.tensor([[299, 0], [299, 257], [3, 299]]))
    expected = torch.zeros(300, dtype=torch.int64)
    expected[[299, 0, 257]] = torch.tensor([2, 1, 1])
    assert torch.equal(buffers.counts[0, :300], expected)


ON_GPU = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("num_experts", [8, 256, 300])
def test_with_ids_kept_the_forward_only_writes_and_each_counted_step_adds_its_real_rows(num_experts, device):
    # live control keeps ids and counters both: the forward writes ids alone (no counting
    # kernels in it, paused or not), and count_rows adds a counted step's real rows
    buffers = RoutingBuffers([0, 3, 5], max_tokens=6, top_k=2, num_experts=num_experts, device=device)
    buffers.enable_counts()
    assert buffers.real_tokens is None
    writers = [buffers.ids_writer(slot) for slot in range(3)]
    generator = torch.Generator().manual_seed(num_experts)
    expected = torch.zeros(3, num_experts, dtype=torch.int64)

    def forward(rows: int) -> torch.Tensor:
        ids = torch.randint(0, num_experts, (rows, 3, 2), generator=generator)
        for slot, write in enumerate(writers):
            write(ids[:, slot].to(device))
        return ids

    forward(6)  # a warm-up or paused forward: never counted
    buffers.set_real_tokens(4)  # what the recorder asks before a step: nothing here
    for real, padded in ((4, 6), (1, 3), (6, 6)):
        ids = forward(padded)
        buffers.count_rows(real)
        for slot in range(3):
            expected[slot] += torch.bincount(ids[:real, slot].reshape(-1), minlength=num_experts)
    forward(5)  # a dummy run between steps
    assert torch.equal(buffers.counts[:, :num_experts].cpu(), expected)
    assert int(buffers.counts[:, num_experts].sum()) == 0 and int(expected.sum()) == (4 + 1 + 6) * 3 * 2
    # a layer no router writes (a monolithic MoE kernel): its rows count in the spare column
    # (at exactly 256 experts uint8's fill, 255, is an expert) and never past the counters
    unwritten = RoutingBuffers([0, 3], max_tokens=6, top_k=2, num_experts=num_experts, device=device)
    unwritten.enable_counts()
    unwritten.ids_writer(0)(torch.zeros((6, 2), dtype=torch.int64, device=device))
    unwritten.count_rows(6)
    fill = min(num_experts, 255 if num_experts <= 256 else 32767)
    assert unwritten.counts[0, 0] == 12 and unwritten.counts[1, fill] == 12 and int(unwritten.counts.sum()) == 24
    buffers.restart_counts()
    assert int(buffers.counts.sum()) == 0


def test_messages_with_numpy_ints_or_container_subclasses_arrive_as_plain_values(monkeypatch):
    from collections import OrderedDict

    import otel_moe.worker.link as link

    monkeypatch.setattr(link, "_checked", 0)  # a fresh process
    monkeypatch.setattr(link, "_convert_all", False)
    plain = (2, [1, 2], {"a": 1}, ["x", None], [("r", 3)])
    assert decode(link.encode_message(plain)) == plain  # as marshal writes it: tuples stay tuples
    assert not link._convert_all
    # numpy ints in plain lists: marshal would write them as bytes, silently
    assert decode(link.encode_message((2, [np.int64(7), np.uint8(200)], {"a": np.int32(-1)}))) == [2, [7, 200], {"a": -1}]
    assert link._convert_all  # from then on every message of this process is converted
    monkeypatch.setattr(link, "_convert_all", False)
    message = (2, np.int64(7), OrderedDict(a=np.int32(1)), ["x", np.uint8(3)], {"b": True})
    assert decode(link.encode_message(message)) == [2, 7, {"a": 1}, ["x", 3], {"b": True}]



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_a_snapshot_s_mark_lands_after_its_copies_on_any_stream():
    buffers = RoutingBuffers([0, 1], max_tokens=64, top_k=2, num_experts=8, device="cuda")
    shared, space = SharedRing(1 << 16), FifoSpace(1 << 16)
    snapshotter = Snapshotter(buffers, shared, space)
    assert shared.pinned
    side = torch.cuda.Stream()
    for step in range(6):
        ids = torch.randint(0, 8, (64, 2), device="cuda")
        for slot in range(2):  # as the routers do in the forward
            buffers.ids_writer(slot)(ids + slot)
            buffers.weights_writer(slot)(torch.full((64, 2), step / 8, device="cuda"))
        with torch.cuda.stream(side if step % 2 else torch.cuda.current_stream()):  # the stream changes
            snapshot = snapshotter.take_tokens(64, None)
        assert snapshot.mark == step and not shared.landed(step + 1)
        torch.cuda.synchronize()
        assert shared.landed(step)
        starts = array_bytes(snapshot.arrays)
        got_ids = shared.array(snapshot.offset + starts[0], np.uint8, (64, 2, 2))
        got_weights = shared.array(snapshot.offset + starts[1], np.float16, (64, 2, 2))
        assert np.array_equal(got_ids[:, 1], (ids + 1).cpu().numpy()) and np.all(got_weights == np.float16(step / 8))
        space.free_oldest(1)

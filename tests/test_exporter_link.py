"""A real recorder and exporter process: the records are exactly the scheduled steps'
real tokens, the exporter reads a step only once its device copy has landed (the
ring's mark), and a stopped exporter never makes the engine thread wait. Scheduler
outputs made here, as vLLM's look."""
from __future__ import annotations

import json
import os
import select
import signal
import types

import numpy as np
import pytest
import torch

from otel_moe.config import from_env
from otel_moe.wire.messages import ACK, NO_MARK, Begin, Step
from otel_moe.wire.ring import MAX_HELD
from otel_moe.worker import binding
from otel_moe.worker.capture import RoutingBuffers
from otel_moe.worker.link import ExporterLink
from otel_moe.worker.recorder import StepRecorder

LAYERS, TOP_K, EXPERTS = 3, 2, 8
PROMPTS = {"a": 5, "b": 3, "c": 4}  # request -> prompt length
DECODE_STEPS = 6


def scheduler_outputs() -> list:
    """a and b start with their prompts, c joins at step 2, b finishes after step 4."""
    computed: dict[str, int] = {}
    outputs = []
    for step in range(DECODE_STEPS):
        new = [r for r in PROMPTS if r not in computed and (r != "c" or step == 2)]
        cached = [r for r in computed]
        finished = ["b"] if step == 5 else []
        cached = [r for r in cached if r not in finished]
        scheduled = {**{r: 1 for r in cached}, **{r: PROMPTS[r] for r in new}}
        outputs.append(types.SimpleNamespace(
            scheduled_new_reqs=[types.SimpleNamespace(req_id=r, num_computed_tokens=0, prompt_token_ids=[1] * PROMPTS[r])
                                for r in new],
            scheduled_cached_reqs=types.SimpleNamespace(req_ids=cached, num_computed_tokens=[computed[r] for r in cached]),
            num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
            finished_req_ids=set(finished)))
        for r in finished:
            del computed[r]
        for r, n in scheduled.items():
            computed[r] = computed.get(r, 0) + n
    return outputs


def expected_tokens() -> list[tuple[int, str, int]]:
    """(step, request, position) of every real token, in batch order."""
    positions: dict[str, int] = {}
    tokens = []
    for step, out in enumerate(scheduler_outputs()):
        for request, n in out.num_scheduled_tokens.items():
            start = positions.get(request, 0)
            tokens += [(step, request, start + i) for i in range(n)]
            positions[request] = start + n
    return tokens


def routed(rows: int, generator) -> list[torch.Tensor]:
    return [torch.randint(0, EXPERTS, (rows, TOP_K), generator=generator) for _ in range(LAYERS)]


class Runner:
    """What the binding wraps of vLLM's model runner: a dummy run is a forward of made-up rows."""

    def __init__(self, writers: list) -> None:
        self.writers = writers

    @binding._wrap_dummy_run
    def _dummy_run(self, num_tokens: int) -> None:
        for (write_ids, _), ids in zip(self.writers, routed(num_tokens, torch.Generator().manual_seed(1))):
            write_ids(ids)


def link_to(path, mode: str = "tokens", backlog: int = 64, ring_bytes: int = 1 << 20) -> ExporterLink:
    """``path``: a JSONL file, or ``"discard"``."""
    return ExporterLink({"destinations": [str(path)], "mode": mode, "resource": {}, "top_k": TOP_K,
                         "num_experts": EXPERTS, "dp_rank": 0, "internal_id_suffix": ""},
                        ring_bytes=ring_bytes, backlog_messages=backlog)


def record(tmp_path, mode: str, dummy_runs: bool = False,
           unsent_step: int = -1) -> tuple[list[dict], list[list[torch.Tensor]]]:
    """The exporter's records, and what each step's forward routed (its real rows);
    ``unsent_step``'s message finds the link refusing it (too large)."""
    path = tmp_path / f"{mode}-{dummy_runs}.jsonl"
    config = from_env({"VLLM_LOG_MOE": str(path), "VLLM_LOG_MOE_MODE": mode,
                       "VLLM_LOG_MOE_COUNTS_INTERVAL_MS": "3600000"})  # one counts window: deterministic
    buffers = RoutingBuffers(list(range(LAYERS)), 64, TOP_K, EXPERTS, "cpu")
    if mode == "counts":
        buffers.enable_counts()
    writers = [(buffers.ids_writer(slot), buffers.weights_writer(slot)) for slot in range(LAYERS)]
    link = link_to(path, mode)
    recorder = StepRecorder(buffers, config, link)
    runner = Runner(writers)
    setattr(runner, binding._RECORDER, recorder)
    generator = torch.Generator().manual_seed(0)
    steps_routed = []
    for index, out in enumerate(scheduler_outputs()):
        n = out.total_num_scheduled_tokens
        if dummy_runs:  # a data-parallel rank with nothing scheduled runs one between steps
            runner._dummy_run(16)
        scheduled = binding.scheduled_step(out)
        assert recorder.begin_step(scheduled) == index
        layers = routed(n + 2, generator)  # the step's forward, padded by 2 rows
        for (write_ids, write_weights), ids in zip(writers, layers):  # as the routers do
            write_ids(ids)
            if write_weights is not None:
                write_weights(torch.full(ids.shape, 0.5))
        steps_routed.append([ids[:n] for ids in layers])
        order = None if recorder.counts_only else list(out.num_scheduled_tokens)  # as the binding hands it
        link.max_message, max_message = (0 if index == unsent_step else link.max_message), link.max_message
        recorder.on_step(scheduled, order, 1000 * index, 1000 * index + 500)
        link.max_message = max_message
    recorder.close(30)
    assert recorder.dropped_steps == link.dropped_messages == (unsent_step >= 0)
    return [json.loads(line) for line in path.read_text().splitlines()], steps_routed


@pytest.mark.parametrize("unsent_step", [-1, 3])
def test_tokens_records_are_the_real_tokens_of_every_step_with_what_they_were_routed_to(tmp_path, unsent_step):
    """Also when one step's message could not go: the next step's layout, which would
    have left out what that one said, goes whole."""
    records, steps_routed = record(tmp_path, "tokens", unsent_step=unsent_step)
    tokens = [token for token in expected_tokens() if token[0] != unsent_step]
    assert len(records) == len(tokens) * LAYERS
    row_of_step = {}
    expected = []
    for step, request, position in tokens:
        row = row_of_step[step] = row_of_step.get(step, -1) + 1
        expected += [(step, layer, request, position, steps_routed[step][layer][row].tolist()) for layer in range(LAYERS)]
    got = [(r["step"], r["layer"], r["request_id"], r["position"], r["expert_ids"]) for r in records]
    assert sorted(got) == sorted(expected)
    assert {r["expert_weights"] == [0.5, 0.5] for r in records} == {True}


def test_counts_records_are_one_window_of_the_real_rows(tmp_path):
    records, steps_routed = record(tmp_path, "counts")
    tokens = len(expected_tokens())
    counts = [np.bincount(torch.cat([step[layer].flatten() for step in steps_routed]).numpy(), minlength=EXPERTS)
              for layer in range(LAYERS)]
    assert [(r["layer"], r["num_tokens"], r["counts"]) for r in records] == [
        (layer, tokens, counts[layer].tolist()) for layer in range(LAYERS)]


def test_dummy_runs_between_steps_count_nothing(tmp_path):
    assert record(tmp_path, "counts", dummy_runs=True)[0] == record(tmp_path, "counts")[0]


def step_message(offset: int, mark: int, request: str, step: int = 0, layout_ids: list | None = None) -> Step:
    """A tokens step of one token of ``request`` (position 0), one layer, as the recorder builds it."""
    ids = layout_ids or [request]
    return Step(offset, [("|u1", [1, 1, TOP_K]), ("<f2", [1, 1, TOP_K])], mark, step, 0, 1, [0], False, 0, 0, 0, 0,
            1, ids, {request: 1}, [], [], [(request, 0)])


def write_step(link: ExporterLink, offset: int, experts: list[int]) -> None:
    link.ring.map[offset: offset + TOP_K] = bytes(experts)
    link.ring.map[offset + 8: offset + 8 + 2 * TOP_K] = np.full(TOP_K, 0.25, np.float16).tobytes()


def acknowledged(link: ExporterLink, within_s: float) -> bool:
    return bool(select.select([link.sock], [], [], within_s)[0]) and len(link.sock.recv(64)) == ACK.size


def test_a_discarding_exporter_reads_and_frees_every_step_and_writes_nothing(tmp_path, monkeypatch):
    """VLLM_LOG_MOE=discard: 240 steps through a ring that holds ~30 at once, none dropped."""
    monkeypatch.chdir(tmp_path)  # before the exporter starts: a sink that wrote a file would write it here
    config = from_env({"VLLM_LOG_MOE": "discard"})
    buffers = RoutingBuffers(list(range(LAYERS)), 64, TOP_K, EXPERTS, "cpu")
    link = link_to("discard", ring_bytes=4096)
    recorder = StepRecorder(buffers, config, link)
    steps = scheduler_outputs() * 40
    for out in steps:
        scheduled = binding.scheduled_step(out)
        recorder.begin_step(scheduled)
        recorder.on_step(scheduled, list(out.num_scheduled_tokens), 0, 1)
        while link.space.held:  # the exporter acknowledges the step: its space is free again
            assert select.select([link.sock], [], [], 30)[0]
            link.free_finished_steps()
    recorder.close(30)
    assert recorder.steps == len(steps) and recorder.dropped_steps == 0 and link.dropped_messages == 0
    assert list(tmp_path.iterdir()) == []


def test_the_exporter_reads_a_step_only_once_its_device_copy_has_landed(tmp_path):
    """As on CUDA: the message goes before the copy lands; the GPU writes the mark after it."""
    path = tmp_path / "r.jsonl"
    link = link_to(path)
    try:
        offset = link.space.reserve(64)
        write_step(link, offset, [7, 7])  # what the ring held before: not this step's
        assert link.send(step_message(offset, 0, "a"))
        assert not acknowledged(link, within_s=0.5)  # it waits for mark 0
        write_step(link, offset, [1, 2])  # the copy lands ...
        link.ring.tensor()[link.ring.nbytes: link.ring.nbytes + 4].view(torch.int32)[0] = 0  # ... then its mark
        assert acknowledged(link, within_s=30)
    finally:
        assert link.close(30)
    assert [(r["request_id"], r["expert_ids"]) for r in map(json.loads, path.read_text().splitlines())] == [("a", [1, 2])]


def test_a_stopped_exporter_never_makes_the_engine_thread_wait(tmp_path):
    """Messages wait in the backlog while the socket is full; past it they are dropped and
    counted at once; once the exporter runs again every one not dropped arrives, in order."""
    path = tmp_path / "r.jsonl"
    link = link_to(path, backlog=4, ring_bytes=64 << 20)
    os.kill(link.proc.pid, signal.SIGSTOP)
    sent = []
    padding = "x" * 4000  # long request ids: the socket fills before MAX_HELD steps are in the ring
    try:
        for step in range(MAX_HELD):
            if not link.has_room():
                break
            offset = link.space.reserve(64)
            write_step(link, offset, [step % EXPERTS, 0])
            assert link.send(step_message(offset, NO_MARK, f"r{step}{padding}", step))
            sent.append(step)
        assert len(link._backlog) == 4 and len(sent) > 4  # the socket took the others
        assert not link.send(Begin([], [], [("late", 1)]))  # no room: dropped, at once
        assert link.dropped_messages == 1
    finally:
        os.kill(link.proc.pid, signal.SIGCONT)
        assert link.close(60)
    assert [r["request_id"] for r in map(json.loads, path.read_text().splitlines())] == [f"r{s}{padding}" for s in sent]


def test_sending_to_a_killed_exporter_says_it_is_gone_and_never_raises(tmp_path, caplog):
    """One line says so; later messages are dropped at once."""
    link = link_to(tmp_path / "r.jsonl")
    assert link.send(Begin([], [], [("a", 1)]))
    link.proc.kill()
    link.proc.wait(30)
    with caplog.at_level("ERROR", logger="vllm.otel_moe"):
        assert not link.send(Begin([], [], [("b", 1)]))
        assert not link.send(Begin([], [], [("c", 1)]))
    assert not link.alive and not link.has_room()
    assert [r.getMessage() for r in caplog.records] == [
        f"otel-moe: the exporter process (pid {link.proc.pid}) exited with code -9; routing is no longer recorded, "
        "vLLM keeps serving"]
    link.close(5)


def test_a_step_too_large_to_send_is_counted_and_still_frees_its_ring_space(tmp_path):
    link = link_to(tmp_path / "r.jsonl")
    try:
        offset = link.space.reserve(64)
        huge = [f"{i:0>1000}" for i in range(5000)]  # 5 MB of distinct request ids: no message takes it
        assert not link.send(step_message(offset, NO_MARK, "a", layout_ids=huge))
        assert link.dropped_messages == 1
        link.skip()  # what the recorder does for a message that held ring space
        assert acknowledged(link, within_s=30) and link.alive
    finally:
        assert link.close(30)


@pytest.mark.parametrize("mode", ["tokens", "counts"])
def test_the_recorder_drops_a_step_when_the_exporter_is_behind(tmp_path, mode):
    """Before any device copy: a step (tokens) or window (counts) that could not go is not copied."""
    path = tmp_path / "r.jsonl"
    config = from_env({"VLLM_LOG_MOE": str(path), "VLLM_LOG_MOE_MODE": mode,
                       "VLLM_LOG_MOE_COUNTS_INTERVAL_MS": "3600000"})
    buffers = RoutingBuffers(list(range(LAYERS)), 64, TOP_K, EXPERTS, "cpu")
    buffers.enable_counts()
    link = link_to(path, mode)
    recorder = StepRecorder(buffers, config, link)
    out = scheduler_outputs()[0]
    scheduled = binding.scheduled_step(out)
    recorder.begin_step(scheduled)
    link._backlog_limit = 0  # as if the backlog were full
    recorder.on_step(scheduled, list(out.num_scheduled_tokens), 0, 1)
    if mode == "counts":
        recorder.close(30)  # the window closes: it finds no room
    assert recorder.dropped_steps == 1 and recorder.dropped_tokens == out.total_num_scheduled_tokens
    assert not link.space.held  # nothing was copied into the ring
    recorder.close(30)
    assert path.read_text() == ""

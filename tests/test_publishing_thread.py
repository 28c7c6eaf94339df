"""The publishing thread (what CUDA workers use: messages encoded off vLLM's engine thread)
hands the exporter exactly what the engine thread's own writes (CPU) do, in both modes.
A real recorder and exporter process; scheduler outputs made here, as vLLM's look."""
from __future__ import annotations

import json
import types

import pytest
import torch

from otel_moe import binding
from otel_moe.capture import RoutingBuffers
from otel_moe.config import from_env
from otel_moe.exporter.link import ExporterLink
from otel_moe.recorder import StepRecorder

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


def forward(writers: list, rows: int, generator=None) -> None:
    for write_ids, write_weights in writers:  # as the routers do
        write_ids(torch.randint(0, EXPERTS, (rows, TOP_K), generator=generator))
        if write_weights is not None:
            write_weights(torch.rand(rows, TOP_K, generator=generator))


class Runner:
    """What the binding wraps of vLLM's model runner: a dummy run is a forward of made-up rows."""

    def __init__(self, writers: list) -> None:
        self.writers = writers

    @binding._wrap_dummy_run
    def _dummy_run(self, num_tokens: int) -> None:
        forward(self.writers, num_tokens)


def record(tmp_path, mode: str, threaded: bool, dummy_runs: bool = False) -> list[dict]:
    path = tmp_path / f"{mode}-{threaded}-{dummy_runs}.jsonl"
    config = from_env({"VLLM_LOG_MOE": str(path), "VLLM_LOG_MOE_MODE": mode,
                       "VLLM_LOG_MOE_COUNTS_INTERVAL_MS": "3600000"})  # one counts window: deterministic
    buffers = RoutingBuffers(list(range(LAYERS)), 64, TOP_K, EXPERTS, "cpu")
    if mode == "counts":
        buffers.enable_counts()
    writers = [(buffers.ids_writer(slot), buffers.weights_writer(slot)) for slot in range(LAYERS)]
    link = ExporterLink({"destinations": [str(path)], "mode": mode, "resource": {}, "top_k": TOP_K,
                         "num_experts": EXPERTS, "dp_rank": 0, "randomized_request_ids": False},
                        ring_bytes=1 << 20, queue_messages=64, events=threaded)
    recorder = StepRecorder(buffers, config, link)
    runner = Runner(writers)
    setattr(runner, binding._RECORDER, recorder)
    generator = torch.Generator().manual_seed(0)
    for index, out in enumerate(scheduler_outputs()):
        n = out.total_num_scheduled_tokens
        if dummy_runs:  # a data-parallel rank with nothing scheduled runs one between steps
            runner._dummy_run(16)
        step = recorder.begin_step(out)
        assert step == index
        forward(writers, n + 2, generator)  # the step's forward, padded by 2 rows
        order = None if recorder.counts_only else list(out.num_scheduled_tokens)  # as the binding hands it
        recorder.on_step(out, order, 1000 * index, 1000 * index + 500)
    recorder.close(30)
    assert recorder.dropped_steps == link.dropped_messages == 0
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["tokens", "counts"])
def test_the_publishing_thread_hands_on_the_same_records(tmp_path, mode):
    direct, threaded = record(tmp_path, mode, threaded=False), record(tmp_path, mode, threaded=True)
    assert threaded == direct
    tokens = sum(PROMPTS.values()) + sum(len(o.scheduled_cached_reqs.req_ids) for o in scheduler_outputs())
    if mode == "tokens":
        assert len(direct) == tokens * LAYERS
    else:  # one window a layer
        assert [(r["layer"], r["num_tokens"], sum(r["counts"])) for r in direct] == [
            (layer, tokens, tokens * TOP_K) for layer in range(LAYERS)]


def test_dummy_runs_between_steps_count_nothing(tmp_path):
    plain = record(tmp_path, "counts", threaded=False)
    assert record(tmp_path, "counts", threaded=False, dummy_runs=True) == plain

"""The expert-load metrics computed in the exporter process, read through the SDK's
in-memory reader: exact counters per layer, expert and phase; gauges per interval."""
from __future__ import annotations

import numpy as np
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_moe.exporter.records import StepRecord
from otel_moe.exporter.sinks.metrics import ExpertMetrics


def step(ids, positions, prompt_lens, request_tokens, dp_rank=0) -> StepRecord:
    ids = np.asarray(ids, np.int32)
    return StepRecord(step=0, start_ns=0, end_ns=0, layers=[3, 5], top_k=ids.shape[2], num_experts=4,
                      request_ids=[f"r{i}" for i in range(len(request_tokens))],
                      request_tokens=np.asarray(request_tokens), positions=np.asarray(positions),
                      prompt_lens=np.asarray(prompt_lens), ids=ids, weights=np.ones(ids.shape, np.float32), dp_rank=dp_rank)


def points(reader) -> dict:
    out = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    out[(metric.name, tuple(sorted(p.attributes.items())))] = p.value
    return out


def test_counters_and_interval_gauges():
    reader = InMemoryMetricReader()
    metrics = ExpertMetrics({"otel_moe.run_id": "r"}, "experts", reader=reader)
    # request r0: prompt of 2 (positions 0, 1 prefill), r1 decoding at position 5 (prompt 3)
    metrics.add(step([[[0, 1], [2, 3]], [[0, 2], [2, 2]], [[1, 0], [3, 3]]], [0, 1, 5], [2, 3], [2, 1]))
    got = points(reader)
    tokens = {(dict(k)["moe.layer"], dict(k)["moe.expert"], dict(k)["moe.phase"]): v
              for (name, k), v in got.items() if name == "moe.expert.tokens"}
    assert tokens == {(3, 0, "prefill"): 2, (3, 1, "prefill"): 1, (3, 2, "prefill"): 1,
                      (5, 2, "prefill"): 3, (5, 3, "prefill"): 1,
                      (3, 1, "decode"): 1, (3, 0, "decode"): 1, (5, 3, "decode"): 2}
    # layer 3 over the interval: experts 0:3 1:2 2:1 3:0 -> max/mean 3/1.5, one unused
    assert got[("moe.layer.imbalance", (("moe.layer", 3), ("otel_moe.dp_rank", 0)))] == 2.0
    assert got[("moe.layer.experts_unused", (("moe.layer", 3), ("otel_moe.dp_rank", 0)))] == 1
    assert got[("moe.layer.experts_unused", (("moe.layer", 5), ("otel_moe.dp_rank", 0)))] == 2  # experts 0 and 1
    metrics.add(step([[[0, 1], [0, 1]]], [7], [2], [1]))  # the next interval: one decode token
    got = points(reader)
    assert got[("moe.layer.imbalance", (("moe.layer", 3), ("otel_moe.dp_rank", 0)))] == 2.0  # 0:1 1:1 -> 1 / 0.5
    assert got[("moe.layer.experts_unused", (("moe.layer", 3), ("otel_moe.dp_rank", 0)))] == 2
    assert got[("moe.expert.tokens", (("moe.expert", 0), ("moe.layer", 3), ("moe.phase", "decode"),
                                      ("otel_moe.dp_rank", 0)))] == 2  # cumulative


def test_layers_detail_has_no_per_expert_series():
    reader = InMemoryMetricReader()
    metrics = ExpertMetrics({}, "layers", reader=reader)
    metrics.add(step([[[0, 1], [2, 3]]], [0], [1], [1]))
    assert {name for name, _ in points(reader)} == {"moe.layer.imbalance", "moe.layer.experts_unused",
                                                    "otel_moe.engine_thread.time", "otel_moe.recorded_steps"}


def test_engine_thread_cost_follows_the_latest_record():
    """Each record carries the recorder's time on vLLM's engine thread so far; steps
    count from the record's index (a counts window: its last step), drops included."""
    import dataclasses

    reader = InMemoryMetricReader()
    metrics = ExpertMetrics({}, "experts", reader=reader)
    first = dataclasses.replace(step([[[0, 1], [2, 3]]], [0], [1], [1], dp_rank=2), step=4, engine_thread_ns=1_500_000)
    metrics.add(first)
    window = dataclasses.replace(first, step=5, last_step=9, window_tokens=6, ids=None, weights=None,
                                 counts=np.ones((2, 4), np.int64), engine_thread_ns=3_000_000)
    metrics.add(window)
    got = points(reader)
    assert got[("otel_moe.engine_thread.time", (("otel_moe.dp_rank", 2),))] == 0.003
    assert got[("otel_moe.recorded_steps", (("otel_moe.dp_rank", 2),))] == 10

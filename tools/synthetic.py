"""Synthetic routing for benchmarks and tests: step records of a made-up model
and a collector-format file written from them through the real OTLP sink and
the collector's own OTLP/JSON conversion (no network, no collector process)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from otel_moe.exporter.records import StepRecord


def records(steps: int, tokens: int, layers: int, top_k: int, experts: int, requests: int = 32,
            seed: int = 0) -> Iterator[StepRecord]:
    """``requests`` new requests a step, ``tokens // requests`` tokens each (half of them prompt);
    distinct experts per token, skewed towards low expert ids."""
    rng = np.random.default_rng(seed)
    per = tokens // requests
    skew = 1.0 / np.arange(1, experts + 1) ** 0.7
    skew /= skew.sum()
    for step in range(steps):
        n = requests * per
        # distinct top-k per token: the k smallest of skewed random keys (Gumbel-top-k)
        keys = np.log(skew)[None, None, :] - np.log(-np.log(rng.random((n, layers, experts))))
        ids = np.argsort(-keys, axis=2)[:, :, :top_k].astype(np.int32)
        weights = np.sort(rng.dirichlet(np.ones(top_k), (n, layers)).astype(np.float32), axis=2)[:, :, ::-1]
        yield StepRecord(
            step=step, start_ns=time.time_ns(), end_ns=time.time_ns(), layers=list(range(layers)), top_k=top_k,
            num_experts=experts, request_ids=[f"r{step}-{r}" for r in range(requests)],
            request_tokens=np.full(requests, per), positions=np.tile(np.arange(per), requests),
            prompt_lens=np.full(requests, per // 2), ids=ids, weights=np.ascontiguousarray(weights))


class _ToFile:
    """A transport for the OTLP sink that writes what the collector would write."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")

    def send(self, body: bytes, spans: int) -> bool:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        from otel_moe.collector.otlp_json import to_json_line

        self.f.write(to_json_line(ExportTraceServiceRequest.FromString(body)))
        return True

    def shutdown(self) -> None:
        self.f.close()


def write_collector_file(path: Path, step_records, run_id: str = "synthetic") -> None:
    """``path``: a traces.json as the embedded collector writes it, run ``run_id``."""
    from otel_moe.config import from_env
    from otel_moe.exporter.sinks.otlp import OtlpSink

    path.parent.mkdir(parents=True, exist_ok=True)
    sink = OtlpSink(from_env({"VLLM_LOG_MOE": "otlp"}), {"otel_moe.run_id": run_id}, transport=_ToFile(path))
    for record in step_records:
        sink.write(record)
        sink.finish(record.request_ids)
    sink.close(60)

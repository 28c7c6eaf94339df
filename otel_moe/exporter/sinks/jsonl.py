"""JSONL sink: one JSON object per token per logged layer (or per window of steps
per layer in counts mode), the prototype's format with exact token attribution.

Several processes (tensor/data parallel ranks) may share one file: it is opened
with O_APPEND and each step goes out in a single ``write``, so lines from
different processes never interleave. Existing content is kept (appended to).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from otel_moe.exporter.records import StepRecord
from otel_moe.schema import DECODE, PREFILL

logger = logging.getLogger("vllm.otel_moe")


def open_append(path: str) -> int:
    """Open (create) ``path`` for appending; raises OSError with the reason."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def token_lines(record: StepRecord) -> list[str]:
    assert record.ids is not None and record.weights is not None
    request_of = record.token_request_index()
    phase = np.where(record.is_prefill(), PREFILL, DECODE)
    quoted_ids = [json.dumps(r) for r in record.request_ids]
    ids, weights, positions = record.ids.tolist(), record.weights.tolist(), record.positions.tolist()
    lines = []
    for t in range(len(positions)):
        who = (
            f', "request_id": {quoted_ids[request_of[t]]}, "position": {positions[t]}, '
            f'"phase": "{phase[t]}", "expert_ids": '
        )
        for column, layer in enumerate(record.layers):
            lines.append(
                f'{{"step": {record.step}, "layer": {layer}{who}{ids[t][column]}, '
                f'"expert_weights": {weights[t][column]}, "num_experts": {record.num_experts}}}\n'
            )
    return lines


def count_lines(record: StepRecord) -> list[str]:
    counts = record.layer_counts().tolist()
    window = f', "last_step": {record.last_step}' if record.is_window else ""
    return [
        f'{{"step": {record.step}{window}, "layer": {layer}, "num_tokens": {record.num_tokens}, '
        f'"counts": {counts[column]}}}\n'
        for column, layer in enumerate(record.layers)
    ]


class JsonlSink:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = open_append(path)
        self.failed_writes = 0

    def begin(self, requests: list[tuple[str, str, str, int]]) -> None:
        pass  # a log of every token: sampling is the traces' (OTEL_TRACES_SAMPLER)

    def write(self, record: StepRecord) -> None:
        if record.ids is None and record.counts is None:
            return  # a counts-mode step's layout: its tokens are in a window's counts
        lines = count_lines(record) if record.ids is None else token_lines(record)
        data = "".join(lines).encode()
        try:
            written = os.write(self.fd, data)
            if written != len(data):  # short write: disk full mid-step
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as err:
            self.failed_writes += 1
            if self.failed_writes == 1:
                logger.warning("otel-moe: cannot write %s (%s); dropping steps and counting", self.path, err)
            raise

    def finish(self, request_ids: list[str], partial: set[str] = frozenset()) -> None:
        pass  # token lines already name their request

    def idle(self) -> None:
        pass  # every step is written when it arrives

    def close(self, timeout_s: float) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass

"""Telemetry trouble never hurts serving: a real engine with the collector down,
and with a JSONL sink on a full disk, finishes with the same tokens."""
from __future__ import annotations

import socket
import time

from conftest import CHUNKED, run_vllm


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tokens(run):
    return [o["output_token_ids"] for o in run.outputs]


def test_collector_down_from_the_start(models, mixtral_eager_layers, tmp_path):
    started = time.monotonic()
    run = run_vllm(tmp_path, {"model": models["mixtral"], "eager": True, **CHUNKED},
                   VLLM_LOG_MOE="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
                   OTEL_EXPORTER_OTLP_TIMEOUT="1", VLLM_LOG_LAYER="1,3")
    assert _tokens(run) == _tokens(mixtral_eager_layers)  # the same run with recording to a file
    assert "OTLP export of" in run.log and "failed" in run.log
    assert time.monotonic() - started < 240  # no hang at exit: the final flush is bounded


def test_jsonl_on_a_full_disk_drops_and_counts(models, mixtral_eager_layers, tmp_path):
    # /dev/full opens fine and fails every write with ENOSPC.
    run = run_vllm(tmp_path, {"model": models["mixtral"], "eager": True, **CHUNKED},
                   VLLM_LOG_MOE="/dev/full", VLLM_LOG_LAYER="1,3")
    assert _tokens(run) == _tokens(mixtral_eager_layers)
    assert "cannot write /dev/full" in run.log
    assert "failed in the sink" in run.log

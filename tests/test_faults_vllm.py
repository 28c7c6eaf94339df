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


def test_collector_killed_mid_run(models, mixtral_long_off, tmp_path):
    """SIGKILL the collector once routing is flowing: vLLM finishes every request with the
    same tokens as without telemetry, and the JSONL sink beside it stays exact."""
    import json
    import signal
    import subprocess
    import sys
    import threading

    from conftest import LONG, VLLM_RUN, CollectorProcess, clean_env

    from tools.verify import exactness_problems

    collector = CollectorProcess(tmp_path / "collected")
    killed = threading.Event()

    def kill_when_routing_arrives():
        live = tmp_path / "collected" / "traces.json"
        while not killed.is_set():  # no event for "a line landed in a file": poll it
            if live.exists() and b'"moe.step"' in live.read_bytes():
                collector.stop(signal.SIGKILL)
                killed.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_routing_arrives, daemon=True)
    watcher.start()
    wd = tmp_path / "on"
    wd.mkdir()
    (wd / "spec.json").write_text(json.dumps({"model": models["mixtral"], **LONG}))
    proc = subprocess.run([sys.executable, str(VLLM_RUN), str(wd / "spec.json"), str(wd / "outputs.json")],
                          env=clean_env(VLLM_LOG_MOE=f"otlp,{wd / 'routing.jsonl'}", OTEL_EXPORTER_OTLP_TIMEOUT="1",
                                        OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint),
                          capture_output=True, text=True, timeout=600)
    killed.set()
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = json.loads((wd / "outputs.json").read_text())["outputs"]
    assert collector.proc.returncode == -signal.SIGKILL  # it really died mid-run
    assert [o["output_token_ids"] for o in outputs] == _tokens(mixtral_long_off)
    records = [json.loads(line) for line in open(wd / "routing.jsonl")]
    assert exactness_problems(records, outputs, [0, 1, 2, 3]) == []
    assert "OTLP export of" in proc.stdout + proc.stderr

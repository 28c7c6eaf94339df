"""The collector refuses to start as it cannot serve, in one line and exit code 2,
and listens on IPv6 loopback when asked."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import CollectorProcess
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otel_moe.report import read


def _start(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otel_moe.cli", "collector", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def running(tmp_path):
    c = CollectorProcess(tmp_path / "first")
    yield c
    c.stop()


def test_the_collector_runs_as_a_batch_process(running):
    """A request that wakes it never preempts vLLM's threads on the same core."""
    import os

    assert os.sched_getscheduler(running.proc.pid) == os.SCHED_BATCH


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_a_second_collector_on_a_taken_port_refuses_to_start(running, tmp_path, which):
    taken = running.grpc_port if which == "grpc" else running.http_port
    ports = ["--grpc-port", str(taken), "--http-port", "0"] if which == "grpc" else \
        ["--grpc-port", "0", "--http-port", str(taken)]
    proc = _start("--out", str(tmp_path / "second"), *ports)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("otel-moe collector: cannot listen for OTLP/") and f":{taken}" in line
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, named", [
    (["--rotate-mb", "-1"], "--rotate-mb"), (["--max-request-mb", "0"], "--max-request-mb"),
    (["--max-request-mb", "nan"], "--max-request-mb"), (["--grpc-port", "70000"], "--grpc-port"),
])
def test_bad_flags_are_refused_in_one_line(tmp_path, args, named):
    proc = _start("--out", str(tmp_path), *args)
    assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = _start("--out", str(tmp_path / "file"), "--grpc-port", "0", "--http-port", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"otel-moe collector: --out {tmp_path / 'file'} is a file, not a folder"


def test_ipv6_loopback(tmp_path):
    collector = CollectorProcess(tmp_path / "v6", "--host", "::1")
    try:
        assert collector.host == "[::1]"
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(HttpExporter(endpoint=f"{collector.http_endpoint}/v1/traces")))
        with provider.get_tracer("t").start_as_current_span("over-ipv6"):
            pass
        provider.shutdown()
    finally:
        assert collector.stop() == 0
    assert [s.name for s in read.iter_collector_spans([str(tmp_path / "v6")])] == ["over-ipv6"]

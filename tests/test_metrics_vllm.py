"""Expert load as OTLP metrics, end to end on real parts: a vLLM engine records
(JSONL and OTLP at once), the embedded collector serves the metrics for
Prometheus, and a real Prometheus server (Debian's package) scrapes it. PromQL's
answers must equal the counts in the same run's JSONL."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter

import pytest
from conftest import CHUNKED, CollectorProcess, run_vllm, start_vllm

PROMETHEUS = shutil.which("prometheus")
# Asked of vLLM's worker process after the run: the recorder (a control, it must be there),
# otel-moe's metrics and OTLP sinks and the exporter's loop. (The OpenTelemetry SDK itself is
# there anyway: vLLM's own tracing imports it; and the flag check at start opens a JSONL file
# with otel_moe.exporter.sinks.jsonl's helper.)
METRICS_MODULES = ["otel_moe.worker.recorder", "otel_moe.exporter.sinks.metrics", "otel_moe.exporter.sinks.otlp", "otel_moe.exporter.receiver"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class Prometheus:
    def __init__(self, workdir, target: str) -> None:
        self.port = _free_port()
        config = workdir / "prometheus.yml"
        config.write_text(f"global: {{scrape_interval: 1s}}\nscrape_configs:\n"
                          f"  - job_name: otel-moe\n    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, promql: str) -> list:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        return _get(url)["data"]["result"]

    def wait_for(self, promql: str, want, limit_s: float = 60) -> list:
        """Prometheus scrapes on its own clock: ask until the answer is ``want`` (or time runs out)."""
        deadline, result = time.monotonic() + limit_s, None
        while time.monotonic() < deadline:
            try:
                result = self.query(promql)
                if want(result):
                    return result
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        return result

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed (make test installs it)")
def test_prometheus_totals_equal_the_recorded_routing(models, tmp_path):
    collector = CollectorProcess(tmp_path / "collected", "--prometheus-port", "0")
    prometheus = Prometheus(tmp_path, f"{collector.host}:{collector.prometheus_port}")
    try:
        routing = tmp_path / "routing.jsonl"
        started = time.monotonic()
        run = run_vllm(tmp_path / "run", {"model": models["qwen2_moe"], **CHUNKED, "worker_modules": METRICS_MODULES},
                       VLLM_LOG_MOE=f"otlp,{routing}", OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint,
                       OTEL_METRIC_EXPORT_INTERVAL="500", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
        run_s = time.monotonic() - started
        # The metrics path lives in the exporter process: vLLM's worker never even imports it.
        assert run.worker_modules_loaded == [["otel_moe.worker.recorder"]]
        records = [json.loads(line) for line in routing.read_text().splitlines()]
        assert len(records) == sum(len(o["prompt_token_ids"]) + len(o["output_token_ids"]) - 1 for o in run.outputs) * 4
        expected = Counter((r["layer"], e) for r in records for e in r["expert_ids"])
        total = sum(expected.values())
        assert total == len(records) * 2  # top-2
        answer = prometheus.wait_for("sum(moe_expert_tokens_total)",
                                     lambda r: bool(r) and float(r[0]["value"][1]) == total)
        assert answer and float(answer[0]["value"][1]) == total, (answer, total)
        by_series = prometheus.query("sum by (moe_layer, moe_expert) (moe_expert_tokens_total)")
        got = {(int(s["metric"]["moe_layer"]), int(s["metric"]["moe_expert"])): float(s["value"][1]) for s in by_series}
        assert got == {key: float(n) for key, n in expected.items()}
        phases = prometheus.query("sum by (moe_phase) (moe_expert_tokens_total)")
        by_phase = {s["metric"]["moe_phase"]: float(s["value"][1]) for s in phases}
        assert by_phase == {phase: float(sum(2 for r in records if r["phase"] == phase)) for phase in ("prefill", "decode")}
        # otel-moe's own cost: every recorded step counted (numbered from 0, none dropped here)
        steps = prometheus.query("otel_moe_recorded_steps_total")
        assert [float(s["value"][1]) for s in steps] == [max(r["step"] for r in records) + 1]
        cost = prometheus.query("otel_moe_engine_thread_time_seconds_total")
        assert len(cost) == 1 and 0 < float(cost[0]["value"][1]) < run_s, cost
        imbalance = prometheus.query("moe_layer_imbalance")
        assert {s["metric"]["moe_layer"] for s in imbalance} <= {"0", "1", "2", "3"}
        lines = (tmp_path / "collected" / "metrics.json").read_text().splitlines()
        assert lines and all("resourceMetrics" in json.loads(line) for line in lines)
    finally:
        prometheus.stop()
        collector.stop()


def _scrape(port: int) -> dict[tuple, float]:
    """moe_expert_tokens_total from a Prometheus text endpoint: (layer, expert, phase) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(int(s.labels["moe_layer"]), int(s.labels["moe_expert"]), s.labels["moe_phase"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "moe_expert_tokens_total"}


def test_the_exporter_serves_its_metrics_for_a_prometheus_scrape(models, tmp_path):
    """OTEL_METRICS_EXPORTER=prometheus: no collector at all; the exporter process of the
    recording worker serves the expert metrics, and a scrape during the run equals the JSONL."""
    port, hold = _free_port(), tmp_path / "release"
    routing = tmp_path / "routing.jsonl"
    proc = start_vllm(tmp_path / "run", {"model": models["qwen2_moe"], **CHUNKED, "hold": str(hold)},
                      VLLM_LOG_MOE=f"otlp,{routing}", OTEL_METRICS_EXPORTER="prometheus",
                      OTEL_TRACES_EXPORTER="none", OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
                      OTEL_EXPORTER_PROMETHEUS_PORT=str(port))
    try:
        outputs = tmp_path / "run" / "outputs.json"
        deadline = time.monotonic() + 600
        while not outputs.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert outputs.exists(), proc.stdout.read()[-4000:] if proc.poll() is not None else "no outputs"
        computed = sum(len(o["prompt_token_ids"]) + len(o["output_token_ids"]) - 1
                       for o in json.loads(outputs.read_text())["outputs"])
        # the exporter may still be writing the last steps: ask until the scrape covers them all
        got, want = {}, computed * 4 * 2  # 4 layers, top-2
        deadline = time.monotonic() + 120
        while sum(got.values()) != want and time.monotonic() < deadline:
            try:
                got = _scrape(port)
            except OSError:
                pass
            time.sleep(0.2)
        records = [json.loads(line) for line in routing.read_text().splitlines()]
        expected = Counter((r["layer"], e, r["phase"]) for r in records for e in r["expert_ids"])
        assert got == {key: float(n) for key, n in expected.items()}
        assert sum(expected.values()) == want
    finally:
        hold.touch()
        assert proc.wait(300) == 0

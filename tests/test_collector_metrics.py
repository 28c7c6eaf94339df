"""OTLP metrics into the embedded collector, from the OpenTelemetry SDK's own
exporters over loopback: metrics.json lines and the Prometheus text endpoint."""
from __future__ import annotations

import json
import urllib.request

import pytest
from conftest import CollectorProcess
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    c = CollectorProcess(tmp_path_factory.mktemp("metrics") / "out", "--prometheus-port", "0")
    yield c
    c.stop()


def _exporter(collector, protocol):
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=collector.grpc_endpoint, insecure=True)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(endpoint=f"{collector.http_endpoint}/v1/metrics")


def _scrape(collector) -> str:
    with urllib.request.urlopen(f"http://{collector.host}:{collector.prometheus_port}/metrics", timeout=10) as r:
        return r.read().decode()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sdk_metrics_reach_the_file_and_prometheus(collector, protocol):
    reader = PeriodicExportingMetricReader(_exporter(collector, protocol), export_interval_millis=3_600_000)
    resource = Resource.create({"service.name": "vllm", "service.instance.id": f"run-{protocol}"})
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    meter = provider.get_meter("otel_moe")
    tokens = meter.create_counter("moe.expert.tokens", unit="{token}")
    imbalance = meter.create_gauge("moe.layer.imbalance", unit="1")
    for layer, expert, n in ((0, 3, 5), (0, 3, 2), (1, 7, 4)):
        tokens.add(n, {"moe.layer": layer, "moe.expert": expert, "moe.phase": "decode"})
    imbalance.set(1.5, {"moe.layer": 0})
    assert reader.force_flush(timeout_millis=30_000)
    provider.shutdown()
    lines = [json.loads(line) for line in (collector.out_dir / "metrics.json").read_text().splitlines()]
    names = {m["name"] for line in lines for rm in line["resourceMetrics"] for sm in rm["scopeMetrics"] for m in sm["metrics"]}
    assert {"moe.expert.tokens", "moe.layer.imbalance"} <= names
    text = _scrape(collector)
    labels = f'job="vllm",instance="run-{protocol}"'
    assert "# TYPE moe_expert_tokens_total counter" in text
    assert f'moe_expert_tokens_total{{{labels},moe_expert="3",moe_layer="0",moe_phase="decode"}} 7' in text
    assert f'moe_expert_tokens_total{{{labels},moe_expert="7",moe_layer="1",moe_phase="decode"}} 4' in text
    assert f'moe_layer_imbalance_ratio{{{labels},moe_layer="0"}} 1.5' in text


def test_a_run_with_only_metrics_still_gets_its_report(tmp_path):
    """Cumulative counters become windows: the heatmap and imbalance over time come from them;
    a run that also has moe.step spans would use those instead (never both)."""
    from otel_moe.report.main import build_report

    c = CollectorProcess(tmp_path / "collected")
    try:
        reader = PeriodicExportingMetricReader(_exporter(c, "grpc"), export_interval_millis=3_600_000)
        provider = MeterProvider(resource=Resource.create({"service.name": "vllm", "otel_moe.run_id": "m1"}),
                                 metric_readers=[reader])
        tokens = provider.get_meter("otel_moe").create_counter("moe.expert.tokens", unit="{token}")
        tokens.add(5, {"moe.layer": 0, "moe.expert": 3, "moe.phase": "decode"})
        tokens.add(4, {"moe.layer": 1, "moe.expert": 7, "moe.phase": "prefill"})
        assert reader.force_flush(timeout_millis=30_000)
        tokens.add(2, {"moe.layer": 0, "moe.expert": 3, "moe.phase": "decode"})
        tokens.add(1, {"moe.layer": 0, "moe.expert": 0, "moe.phase": "decode"})
        assert reader.force_flush(timeout_millis=30_000)
        provider.shutdown()
    finally:
        c.stop()
    summary = build_report([str(tmp_path / "collected")], str(tmp_path / "report"))
    assert summary["run"] == "m1" and summary["steps"] == 2  # two exports that grew
    assert summary["layers"]["0"]["counts"] == [1, 0, 0, 7]
    assert summary["layers"]["1"]["counts"] == [0] * 7 + [4]
    assert summary["inputs"]["bad_lines"] == 0 and (tmp_path / "report" / "imbalance_heatmap.png").exists()

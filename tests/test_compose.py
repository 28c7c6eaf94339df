"""docker-compose.yml and the Collector config: no Docker engine here, so the
structure is checked against what the rest of the project assumes."""
from __future__ import annotations

from pathlib import Path

import yaml

from otel_moe import schema

ROOT = Path(__file__).resolve().parent.parent
CONFIG = yaml.safe_load((ROOT / "collector" / "otel-collector-config.yaml").read_text())
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_pipelines_use_only_defined_components():
    for pipeline in CONFIG["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for name in pipeline.get(kind, []):
                assert name in CONFIG[kind], name


def test_receiver_ports_match_compose_and_the_embedded_collector():
    grpc = CONFIG["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    http = CONFIG["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert grpc.endswith(":4317") and http.endswith(":4318")
    ports = COMPOSE["services"]["otel-collector"]["ports"]
    assert {"4317:4317", "4318:4318"} <= set(ports)
    import argparse  # the embedded collector's defaults are the same ports

    from otel_moe.collector.server import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args(["--out", "x"])
    assert (defaults.grpc_port, defaults.http_port, defaults.host) == (4317, 4318, "127.0.0.1")


def test_file_exporter_writes_otlp_json_into_the_mounted_folder():
    exporter = CONFIG["exporters"]["file"]
    assert exporter["format"] == "json" and exporter["rotation"]["max_megabytes"] > 0
    mounts = dict(v.rsplit(":", 1) if v.count(":") == 1 else v.split(":")[:2] for v in COMPOSE["services"]["otel-collector"]["volumes"])
    data_host = [host for host, container in mounts.items() if container == "/data"]
    assert data_host == ["./out/collected"]
    assert exporter["path"].startswith("/data/") and exporter["path"].endswith("traces.json")
    config_mount = [c for h, c in mounts.items() if h.endswith("otel-collector-config.yaml")]
    assert config_mount and f"--config={config_mount[0]}" in COMPOSE["services"]["otel-collector"]["command"]


def test_jaeger_gets_slim_spans():
    assert CONFIG["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0] in COMPOSE["services"]
    statements = {group["context"]: " ".join(group["statements"]) for group in CONFIG["processors"]["transform/slim"]["trace_statements"]}
    for payload in (schema.EXPERT_IDS, schema.EXPERT_WEIGHTS):
        assert f'delete_key(attributes, "{payload}")' in statements["spanevent"]
    assert f'delete_key(attributes, "{schema.REQUEST_EXPERT_COUNTS}")' in statements["span"]
    assert "16686:16686" in COMPOSE["services"]["jaeger"]["ports"]
    assert COMPOSE["services"]["jaeger"]["image"].startswith("jaegertracing/jaeger:2")


def test_readme_names_the_same_ports_and_commands():
    readme = (ROOT / "README.md").read_text()
    for text in ("docker compose up", "http://localhost:16686", "4317", "4318", "make demo", "make test"):
        assert text in readme, text


def _volumes(service: str) -> dict[str, str]:
    return {v.split(":")[1]: v.split(":")[0] for v in COMPOSE["services"][service]["volumes"]}


def test_metrics_pipeline_files_and_prometheus():
    pipeline = CONFIG["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"] and set(pipeline["exporters"]) == {"file/metrics", "prometheus"}
    assert CONFIG["exporters"]["file/metrics"]["path"] == "/data/metrics.json"
    port = CONFIG["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert f"{port}:{port}" in COMPOSE["services"]["otel-collector"]["ports"]
    scrape = yaml.safe_load((ROOT / _volumes("prometheus")["/etc/prometheus/prometheus.yml"]).read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert f"otel-collector:{port}" in targets and "host.docker.internal:8000" in targets


def test_grafana_dashboard_queries_name_metrics_that_exist():
    import json
    import re

    volumes = _volumes("grafana")
    dashboards = ROOT / volumes["/var/lib/grafana/dashboards"]
    provider = yaml.safe_load((ROOT / volumes["/etc/grafana/provisioning"] / "dashboards" / "otel-moe.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((ROOT / volumes["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads((dashboards / "otel-moe.json").read_text())
    ours = {"moe_expert_tokens_total", "moe_layer_imbalance", "moe_layer_experts_unused"}
    from otel_moe.collector.prometheus import metric_name

    # the names the Collector's prometheus exporter (and ours) give otel-moe's instruments
    assert {metric_name("moe.expert.tokens", "{token}", True), metric_name("moe.layer.imbalance", "{ratio}", False),
            metric_name("moe.layer.experts_unused", "{expert}", False)} == ours
    import importlib.util

    # vLLM's metric names, read from its source without importing vLLM (seconds)
    loggers = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py"
    vllm_names = set(re.findall(r'"(vllm:[a-z_]+)"', loggers.read_text()))
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\b((?:vllm:)?[a-z_]+(?:_total|_bucket|_imbalance|_unused))\b", target["expr"]):
                base = re.sub(r"_(total|bucket)$", "", name) if name.startswith("vllm:") else name
                assert name in ours or base in vllm_names, (panel["title"], name)
                used.add(name)
    assert ours <= used
    assert any(n.startswith("vllm:") for n in used)

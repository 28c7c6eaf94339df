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
    statements = " ".join(CONFIG["processors"]["transform/slim"]["trace_statements"][0]["statements"])
    for payload in (schema.EXPERT_IDS, schema.EXPERT_WEIGHTS):
        assert f'delete_key(attributes, "{payload}")' in statements
    assert "16686:16686" in COMPOSE["services"]["jaeger"]["ports"]
    assert COMPOSE["services"]["jaeger"]["image"].startswith("jaegertracing/jaeger:2")


def test_readme_names_the_same_ports_and_commands():
    readme = (ROOT / "README.md").read_text()
    for text in ("docker compose up", "http://localhost:16686", "4317", "4318", "make demo", "make test"):
        assert text in readme, text

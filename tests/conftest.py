"""Shared fixtures: tiny models built once, and real vLLM runs in subprocesses.

Every engine run is a session fixture so each configuration starts one engine
for the whole suite; tests only read the files the run left behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_moe.collector.process import CollectorProcess  # noqa: F401  (tests import it from here)

HERE = Path(__file__).parent
VLLM_RUN = HERE / "vllm_run.py"
FLAGS = ("VLLM_LOG_MOE", "VLLM_LOG_LAYER", "VLLM_LOG_MOE_MODE", "VLLM_NUM_MOE_LAYERS", "VLLM_LOG_MOE_CONTROL",
         "VLLM_LOG_MOE_QUEUE_STEPS", "OTEL_MOE_RUN_ID", "VLLM_API_KEY")


def clean_env(**flags: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in FLAGS and not k.startswith("OTEL_")}
    env.update(flags)
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    return env


class VllmRun:
    def __init__(self, workdir: Path, outputs: list, log: str, routing: Path | None,
                 worker_modules_loaded: list | None = None, metrics: dict | None = None):
        self.workdir = workdir
        self.outputs = outputs
        self.log = log
        self.routing = routing
        self.worker_modules_loaded = worker_modules_loaded  # per worker, when the spec asked
        self.metrics = metrics or {}  # vLLM's metrics the spec asked for, after the run

    def records(self) -> list[dict]:
        with open(self.routing) as f:
            return [json.loads(line) for line in f]


def run_vllm(workdir: Path, spec: dict, timeout: int = 600, **flags: str) -> VllmRun:
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / "spec.json", workdir / "outputs.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(VLLM_RUN), str(spec_path), str(out_path)],
        env=clean_env(**flags), cwd=workdir, capture_output=True, text=True, timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    (workdir / "vllm.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM run failed ({proc.returncode}); log tail:\n{log[-4000:]}")
    routing = flags.get("VLLM_LOG_MOE")
    result = json.loads(out_path.read_text())
    return VllmRun(workdir, result["outputs"], log, Path(routing) if routing and routing != "otlp" else None,
                   result.get("worker_modules_loaded"), result.get("metrics"))


def pytest_collection_modifyitems(items) -> None:
    """Every test that starts a vLLM engine (its module is *_vllm.py, it needs the tiny models,
    or it says so) is marked ``vllm``: ``pytest -m "not vllm"`` runs the rest in seconds."""
    for item in items:
        if item.module.__name__.endswith("_vllm") or "models" in item.fixturenames or item.get_closest_marker("vllm"):
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    from otel_moe import tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: tiny_model.build(str(root / arch), arch) for arch in ("qwen2_moe", "mixtral", "olmoe")}


# Prompts of very different lengths, generation lengths that differ, and a small
# token budget per step: prefill is chunked and mixed with other requests' decodes.
PROMPTS = [
    "the expert router sends every token to a few experts " * 6,
    "Hello, world!",
    "a mixture of experts is fast because most experts rest while others work " * 3,
    "x",
    "telemetry shows the routing layer by layer step by step request by request",
]
MAX_TOKENS = [6, 12, 3, 9, 5]
CHUNKED = {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "max_num_batched_tokens": 16}


@pytest.fixture(scope="session")
def qwen2_compiled(models, tmp_path_factory) -> VllmRun:
    """Also under vLLM's torch profiler (its trace in ``profile/``): compiled, so
    the MoE layers run inside the graph and the trace has step ranges only."""
    wd = tmp_path_factory.mktemp("qwen2_compiled")
    return run_vllm(wd, {"model": models["qwen2_moe"], **CHUNKED, "profile_dir": str(wd / "profile"),
                         "profile_batches": [0]}, VLLM_LOG_MOE=str(wd / "routing.jsonl"))


@pytest.fixture(scope="session")
def qwen2_compiled_off(models, tmp_path_factory) -> VllmRun:
    wd = tmp_path_factory.mktemp("qwen2_off")
    return run_vllm(wd, {"model": models["qwen2_moe"], **CHUNKED})


@pytest.fixture(scope="session")
def mixtral_eager_layers(models, tmp_path_factory) -> VllmRun:
    wd = tmp_path_factory.mktemp("mixtral_eager")
    return run_vllm(wd, {"model": models["mixtral"], "eager": True, **CHUNKED},
                    VLLM_LOG_MOE=str(wd / "routing.jsonl"), VLLM_LOG_LAYER="1,3",
                    VLLM_NUM_MOE_LAYERS="24")


@pytest.fixture(scope="session")
def olmoe_eager_counts(models, tmp_path_factory) -> VllmRun:
    wd = tmp_path_factory.mktemp("olmoe_counts")
    return run_vllm(wd, {"model": models["olmoe"], "eager": True, **CHUNKED},
                    VLLM_LOG_MOE=str(wd / "routing.jsonl"), VLLM_LOG_MOE_MODE="counts",
                    VLLM_LOG_LAYER="0-2")


# Long generations: telemetry trouble can be made to happen mid-run.
LONG = {"prompts": ["the expert router sends every token to a few experts"] * 4, "max_tokens": 300,
        "max_num_batched_tokens": 64, "max_model_len": 512, "eager": True}


@pytest.fixture(scope="session")
def mixtral_long_off(models, tmp_path_factory) -> VllmRun:
    """The LONG generations without otel-moe: the tokens every faulty run must still produce."""
    return run_vllm(tmp_path_factory.mktemp("mixtral_long_off"), {"model": models["mixtral"], **LONG})


def start_vllm(workdir: Path, spec: dict, **flags: str) -> subprocess.Popen:
    """A vLLM run in the background (tests that act on it while it runs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps(spec))
    return subprocess.Popen([sys.executable, str(VLLM_RUN), str(workdir / "spec.json"), str(workdir / "outputs.json")],
                            env=clean_env(**flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


SHARED_PREFIX = "the model learns which expert knows what " * 20


@pytest.fixture(scope="session")
def qwen2_prefix_cached(models, tmp_path_factory) -> VllmRun:
    """Two batches; the second repeats a long prefix of the first, so it hits the cache.
    The second runs under vLLM's torch profiler (eager: layer ranges too)."""
    wd = tmp_path_factory.mktemp("qwen2_prefix")
    prompts = [SHARED_PREFIX + "one", SHARED_PREFIX + "two two", SHARED_PREFIX + "three"]
    spec = {"model": models["qwen2_moe"], "eager": True, "prompts": prompts, "max_tokens": 4,
            "max_num_batched_tokens": 128, "prefix_caching": True, "batches": [[0], [1, 2]],
            "profile_dir": str(wd / "profile"), "profile_batches": [1]}
    return run_vllm(wd, spec, VLLM_LOG_MOE=str(wd / "routing.jsonl"))


@pytest.fixture
def collector(tmp_path):
    c = CollectorProcess(tmp_path / "collected")
    yield c
    c.stop()


def otlp_env(endpoint: str, protocol: str = "grpc", **extra: str) -> dict:
    # vLLM's own tracing reads only the TRACES_ protocol variable.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": "otel-moe-test", **extra}


class PipelineRun:
    """A real vLLM run exporting routing (and vLLM's request spans) to a real collector."""

    def __init__(self, run: VllmRun, files: Path):
        self.run = run
        self.files = files


def _pipeline_run(tmp_path_factory, name: str, model: str, protocol: str, **spec) -> PipelineRun:
    wd = tmp_path_factory.mktemp(name)
    c = CollectorProcess(wd / "collected")
    endpoint = c.grpc_endpoint if protocol == "grpc" else c.http_endpoint
    # vLLM exports its llm_request spans to exactly this URL (and sets it as
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT for otel-moe too): with HTTP it names the path.
    traces_url = endpoint if protocol == "grpc" else f"{endpoint}/v1/traces"
    try:
        run = run_vllm(wd, {"model": model, "otlp_traces_endpoint": traces_url, **CHUNKED, **spec},
                       VLLM_LOG_MOE=f"otlp,{wd / 'routing.jsonl'}", **otlp_env(endpoint, protocol))
    finally:
        assert c.stop() == 0
    run.routing = wd / "routing.jsonl"
    return PipelineRun(run, wd / "collected")


@pytest.fixture(scope="session")
def grpc_pipeline(models, tmp_path_factory) -> PipelineRun:
    return _pipeline_run(tmp_path_factory, "grpc_pipeline", models["qwen2_moe"], "grpc", eager=True)


@pytest.fixture(scope="session")
def http_pipeline(models, tmp_path_factory) -> PipelineRun:
    return _pipeline_run(tmp_path_factory, "http_pipeline", models["mixtral"], "http/protobuf", eager=True)

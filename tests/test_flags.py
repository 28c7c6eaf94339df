"""Flags: every invalid value is refused by name, at start, on a real vLLM too."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import clean_env

from otel_moe.config import ConfigError, from_env, parse_layers
from otel_moe.plugin import register


def test_unset_or_empty_means_off():
    assert from_env({}) is None
    assert from_env({"VLLM_LOG_MOE": "  "}) is None


def test_defaults():
    cfg = from_env({"VLLM_LOG_MOE": "/tmp/x.jsonl"})
    assert (cfg.destinations, cfg.mode, cfg.layers.layers, cfg.expected_moe_layers) == (("/tmp/x.jsonl",), "tokens", None, None)
    assert from_env({"VLLM_LOG_MOE": "OTLP"}).destinations == ("otlp",)
    assert from_env({"VLLM_LOG_MOE": "otlp, /tmp/x.jsonl"}).destinations == ("otlp", "/tmp/x.jsonl")
    discard = from_env({"VLLM_LOG_MOE": " Discard "})
    assert (discard.destinations, discard.jsonl_paths) == (("discard",), [])


@pytest.mark.parametrize("text, layers", [
    ("0", {0}), ("0,12,23", {0, 12, 23}), ("0-5", set(range(6))), ("all", None), ("ALL", None),
    ("", None), ("1-3, 7", {1, 2, 3, 7}), ("4-4", {4}), ("0-4095", set(range(4096))), (" 2 - 3 ", {2, 3}),
])
def test_layer_syntax(text, layers):
    got = parse_layers(text).layers
    assert (None if got is None else set(got)) == layers


@pytest.mark.parametrize("env, var", [
    ({"VLLM_LOG_LAYER": "abc"}, "VLLM_LOG_LAYER"),
    ({"VLLM_LOG_LAYER": "5-2"}, "VLLM_LOG_LAYER"),
    ({"VLLM_LOG_LAYER": "-1"}, "VLLM_LOG_LAYER"),
    ({"VLLM_LOG_LAYER": "1,,2"}, "VLLM_LOG_LAYER"),
    ({"VLLM_LOG_LAYER": "1_000"}, "VLLM_LOG_LAYER"),
    ({"VLLM_LOG_LAYER": "+1"}, "VLLM_LOG_LAYER"),
    ({"VLLM_LOG_LAYER": "\uff11"}, "VLLM_LOG_LAYER"),  # a full-width digit one
    ({"VLLM_LOG_LAYER": "0-4096"}, "VLLM_LOG_LAYER"),
    ({"VLLM_LOG_LAYER": "0-1000000000000"}, "VLLM_LOG_LAYER"),
    ({"VLLM_LOG_MOE_RING_MB": "0"}, "VLLM_LOG_MOE_RING_MB"),
    ({"VLLM_LOG_MOE_COUNTS_INTERVAL_MS": "soon"}, "VLLM_LOG_MOE_COUNTS_INTERVAL_MS"),
    ({"VLLM_LOG_MOE_MODE": "histogram"}, "VLLM_LOG_MOE_MODE"),
    ({"VLLM_NUM_MOE_LAYERS": "0"}, "VLLM_NUM_MOE_LAYERS"),
    ({"VLLM_NUM_MOE_LAYERS": "twenty"}, "VLLM_NUM_MOE_LAYERS"),
    ({"VLLM_LOG_MOE_QUEUE_STEPS": "-4"}, "VLLM_LOG_MOE_QUEUE_STEPS"),
    ({"VLLM_LOG_MOE": "otlp,", }, "VLLM_LOG_MOE"),
    ({"VLLM_LOG_MOE": "discard,otlp", }, "VLLM_LOG_MOE"),  # it records nothing: with a sink it is a mistake
    ({"VLLM_LOG_MOE": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"VLLM_LOG_MOE": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
    ({"VLLM_LOG_MOE": "otlp", "OTEL_EXPORTER_PROMETHEUS_PORT": "metrics"}, "OTEL_EXPORTER_PROMETHEUS_PORT"),
    ({"VLLM_LOG_MOE": "otlp", "OTEL_EXPORTER_PROMETHEUS_PORT": "70000"}, "OTEL_EXPORTER_PROMETHEUS_PORT"),
])
def test_invalid_values_are_refused_by_name(env, var):
    with pytest.raises(ConfigError) as err:  # "0-1000000000000" is refused before a set of that size is built
        from_env({"VLLM_LOG_MOE": "/tmp/x.jsonl", **env})
    message = str(err.value)
    assert var in message and repr(env[var]) in message and "allowed" in message


def test_directory_is_not_a_log_path(tmp_path):
    with pytest.raises(ConfigError, match="VLLM_LOG_MOE"):
        from_env({"VLLM_LOG_MOE": str(tmp_path)})


def test_unwritable_path_refused_at_register(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("VLLM_LOG_MOE", str(blocker / "under-a-file.jsonl"))
    with pytest.raises(ConfigError, match="VLLM_LOG_MOE=.*cannot be opened"):
        register()


def test_layer_missing_from_model_is_refused():
    sel = parse_layers("2,9")
    with pytest.raises(ConfigError) as err:
        sel.check_against({0, 1, 2, 3})
    assert "VLLM_LOG_LAYER='2,9'" in str(err.value) and "0-3" in str(err.value) and "[9]" in str(err.value)


def test_register_is_a_no_op_when_off(monkeypatch):
    monkeypatch.delenv("VLLM_LOG_MOE", raising=False)
    before = set(sys.modules)
    register()
    assert not {m for m in set(sys.modules) - before if m.startswith(("vllm", "torch", "otel_moe.worker.binding"))}


LLM_START = (
    "import sys\n"
    "from vllm import LLM\n"
    "if __name__ == '__main__':\n"
    "    LLM(model=sys.argv[1], enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=256)\n"
)


def _start_vllm(model: str, **flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LLM_START, model], env=clean_env(**flags),
                          capture_output=True, text=True, timeout=300)


def test_vllm_refuses_bad_mode_at_start(models, tmp_path):
    proc = _start_vllm(models["qwen2_moe"], VLLM_LOG_MOE=str(tmp_path / "r.jsonl"), VLLM_LOG_MOE_MODE="bogus")
    assert proc.returncode != 0
    assert "VLLM_LOG_MOE_MODE='bogus' is invalid; allowed: tokens or counts" in proc.stderr


def test_vllm_refuses_layer_the_model_lacks(models, tmp_path):
    proc = _start_vllm(models["qwen2_moe"], VLLM_LOG_MOE=str(tmp_path / "r.jsonl"), VLLM_LOG_LAYER="2,7")
    assert proc.returncode != 0
    assert "VLLM_LOG_LAYER='2,7' is invalid; allowed: MoE layers of this model (0-3)" in proc.stdout + proc.stderr

"""Tensor parallel 2 with the exporter process: only rank 0 records, once, exactly.
Needs two CUDA GPUs (skipped elsewhere). Eager: vLLM 0.26's compiled TP=2 engine dies
in its own profile run on the lent machines, with or without otel-moe."""
from __future__ import annotations

import pytest
from conftest import CHUNKED, run_vllm
from exactness import assert_exact


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch with CUDA: a CPU machine
        return 0


@pytest.mark.skipif(_cuda_devices() < 2, reason="needs two CUDA GPUs")
def test_tensor_parallel_2_records_rank_0_once_exactly(models, tmp_path):
    routing = tmp_path / "routing.jsonl"
    run = run_vllm(tmp_path, {"model": models["qwen2_moe"], **CHUNKED, "eager": True, "tp": 2}, VLLM_LOG_MOE=str(routing))
    # exact = every computed token of every layer once: a second rank recording would double the count
    assert_exact(run.records(), run.outputs, layers=[0, 1, 2, 3], top_k=2, num_experts=8)

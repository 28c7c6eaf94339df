"""tools/py_spy_summary.py reads py-spy's raw output as py-spy 0.4 writes it with
--subprocesses and --threads: parents first in the chain, command lines that hold newlines."""
from __future__ import annotations

from tools.py_spy_summary import summarize  # noqa: E402

RAW = '''process 10:"vllm serve m";process 11:"VLLM::EngineCore";thread (11): MainThread;run_busy_loop (vllm/v1/engine/core.py:900);execute_model (otel_moe/binding.py:135);execute_model (vllm/v1/worker/gpu_model_runner.py:2000) 70
process 10:"vllm serve m";process 11:"VLLM::EngineCore";thread (11): MainThread;run_busy_loop (vllm/v1/engine/core.py:900);execute_model (otel_moe/binding.py:138);_telemetry (otel_moe/binding.py:160);on_step (otel_moe/recorder.py:150);dumps (marshal) 20
process 10:"vllm serve m";process 11:"VLLM::EngineCore";thread (12): EngineCoreOutputQueueThread;process_output_sockets (vllm/v1/engine/core.py:1100) 10
process 10:"vllm serve m";process 13:"python -c import x
print(1)";thread (13): MainThread;<module> (<string>:2) 5
'''


def test_samples_by_process_and_thread_and_otel_moe_s_own_share(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_text(RAW)
    threads = summarize(str(path))
    engine = threads[("11 VLLM::EngineCore", "MainThread")]
    # the wrapper of vLLM's execute_model is on the stack for the whole forward: only the
    # samples below otel-moe's innermost frame with no vLLM frame under it are otel-moe's
    assert engine[:2] == [90, 20]
    assert dict(engine[2]) == {"execute_model (vllm/v1/worker/gpu_model_runner.py:2000)": 70, "dumps (marshal)": 20}
    assert threads[("11 VLLM::EngineCore", "EngineCoreOutputQueueThread")][:2] == [10, 0]
    assert threads[("13 python -c import x print(1)", "MainThread")][:2] == [5, 0]
    assert len(threads) == 3

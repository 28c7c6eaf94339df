"""Live control on a real ``vllm serve``: recording stopped, restarted on other
layers in counts mode, switched back, all through the plugin's HTTP endpoints,
while one server keeps running."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import clean_env

VLLM_SERVE = Path(__file__).parent / "vllm_serve.py"

API_KEY = "test-key"
PROMPTS = {  # request id -> (prompt, max_tokens); sent one after another
    "before-stop": ("the router picks two experts for every token " * 3, 5),
    "while-stopped": ("nothing of this request may be recorded " * 2, 6),
    "counts-1-3": ("now only layers one and three, as histograms", 4),
    "tokens-again": ("every layer and every token again " * 2, 3),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, workdir: Path) -> None:
        self.model = model
        self.workdir = workdir
        self.routing = workdir / "routing.jsonl"
        self.control = workdir / "control.json"
        self.port = _free_port()
        self.log = workdir / "serve.log"
        env = clean_env(VLLM_LOG_MOE=str(self.routing), VLLM_LOG_MOE_CONTROL=str(self.control))
        self.proc = subprocess.Popen(
            [sys.executable, str(VLLM_SERVE), "serve", model, "--port", str(self.port),
             "--host", "127.0.0.1", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "8",
             "--max-num-batched-tokens", "64", "--gpu-memory-utilization", "0.2", "--seed", "0",
             "--api-key", API_KEY, "--middleware", "otel_moe.control.http.middleware"],
            env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._started = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._started.wait(600) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("vllm serve did not start; log tail:\n" + "".join(self.lines[-60:]))

    def _read_log(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Application startup complete" in line:
                self._started.set()
        self._started.set()  # exited: let the waiter look

    def call(self, method: str, path: str, body: dict | None = None, key: str | None = API_KEY,
             headers: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def complete(self, request_id: str) -> dict:
        prompt, max_tokens = PROMPTS[request_id]
        status, body = self.call("POST", "/v1/completions", {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True}, headers={"X-Request-Id": request_id})
        assert status == 200, body
        return body["usage"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        (self.log).write_text("".join(self.lines))
        return self.proc.returncode


@pytest.fixture(scope="session")
def controlled_serve(models, tmp_path_factory):
    """One server, one scripted session of control calls and requests; the
    tests read what each call answered and what the server recorded."""
    server = Server(models["qwen2_moe"], tmp_path_factory.mktemp("serve_control"))
    answers, usage = {}, {}
    try:
        answers["status unauthenticated"] = server.call("GET", "/otel_moe/recording", key=None)
        answers["status at start"] = server.call("GET", "/otel_moe/recording")
        usage["before-stop"] = server.complete("before-stop")
        answers["stop"] = server.call("POST", "/otel_moe/recording/stop")
        usage["while-stopped"] = server.complete("while-stopped")
        answers["bad mode"] = server.call("POST", "/otel_moe/recording", {"mode": "bogus"})
        answers["bad field"] = server.call("POST", "/otel_moe/recording", {"layer": "1"})
        answers["start counts 1,3"] = server.call("POST", "/otel_moe/recording/start", {"layers": "1,3", "mode": "counts"})
        usage["counts-1-3"] = server.complete("counts-1-3")
        answers["tokens all"] = server.call("POST", "/otel_moe/recording", {"layers": "all", "mode": "tokens"})
        usage["tokens-again"] = server.complete("tokens-again")
        answers["unknown endpoint"] = server.call("POST", "/otel_moe/recording/pause")
    finally:
        returncode = server.stop()
    return server, answers, usage, returncode


def _rows(server) -> list[dict]:
    return [json.loads(line) for line in server.routing.read_text().splitlines()]


def _tokens(usage: dict) -> int:
    # every prompt token and every generated token but the last goes through the model
    return usage["prompt_tokens"] + usage["completion_tokens"] - 1


def test_control_endpoints_answer_the_state_or_a_named_error(controlled_serve):
    server, answers, _, returncode = controlled_serve
    assert returncode == 0, "".join(server.lines[-40:])
    assert answers["status unauthenticated"][0] == 401
    assert answers["status at start"] == (200, {"recording": True, "layers": "all", "mode": "tokens"})
    assert answers["stop"] == (200, {"recording": False, "layers": "all", "mode": "tokens"})
    assert answers["bad mode"][0] == 400 and "mode='bogus' is invalid; allowed: tokens or counts" in answers["bad mode"][1]["error"]
    assert answers["bad field"][0] == 400 and "unknown field(s) ['layer']" in answers["bad field"][1]["error"]
    assert answers["start counts 1,3"] == (200, {"recording": True, "layers": "1,3", "mode": "counts"})
    assert answers["tokens all"] == (200, {"recording": True, "layers": "all", "mode": "tokens"})
    assert answers["unknown endpoint"][0] == 404
    # the file keeps only what was set, so the flags still decide the rest
    assert json.loads(server.control.read_text()) == {"recording": True, "layers": "all", "mode": "tokens"}


def test_recording_follows_the_control_calls(controlled_serve):
    server, _, usage, _ = controlled_serve
    rows = _rows(server)
    token_rows = [r for r in rows if "expert_ids" in r]
    count_rows = [r for r in rows if "counts" in r]
    positions = defaultdict(lambda: defaultdict(list))  # request -> layer -> positions
    for r in token_rows:
        positions[r["request_id"]][r["layer"]].append(r["position"])
    recorded = {request_id.removeprefix("cmpl-").rsplit("-", 1)[0] for request_id in positions}
    # nothing while stopped; the requests recorded in tokens mode are exact, on every layer
    assert recorded == {"before-stop", "tokens-again"}
    for request_id, by_layer in positions.items():
        name = request_id.removeprefix("cmpl-").rsplit("-", 1)[0]
        assert sorted(by_layer) == [0, 1, 2, 3]
        for layer_positions in by_layer.values():
            assert sorted(layer_positions) == list(range(_tokens(usage[name])))
    # counts mode, layers 1 and 3 only, covers exactly the tokens of the one request sent then
    assert {r["layer"] for r in count_rows} == {1, 3}
    for layer in (1, 3):
        layer_rows = [r for r in count_rows if r["layer"] == layer]
        assert sum(r["num_tokens"] for r in layer_rows) == _tokens(usage["counts-1-3"])
        assert all(sum(r["counts"]) == 2 * r["num_tokens"] for r in layer_rows)  # top_k = 2
    # steps are numbered only while recording: one run of indices, no gap for the stopped part
    assert sorted({r["step"] for r in rows}) == list(range(len({r["step"] for r in rows})))
    applied = [line for line in server.lines if "otel-moe: control: recording is now" in line]
    assert len(applied) == 3  # stop, start counts, tokens all (refused calls never reached the file)

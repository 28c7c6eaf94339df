"""Live control on a real ``vllm serve``: recording stopped, restarted on other
layers in counts mode, switched back and switched again under a running
request, all through the plugin's HTTP endpoints while one server keeps
running, recording to JSONL and through OTLP to a real collector."""
from __future__ import annotations

import json
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import CollectorProcess, otlp_env
from serving import Server

from otel_moe import schema
from otel_moe.report import read

API_KEY = "test-key"
PROMPTS = {  # request id -> (prompt, max_tokens); sent one after another
    "before-stop": ("the router picks two experts for every token " * 3, 5),
    "while-stopped": ("nothing of this request may be recorded " * 2, 6),
    "counts-1-3": ("now only layers one and three, as histograms", 4),
    "tokens-again": ("every layer and every token again " * 2, 3),
    "across-switch": ("a long answer, during which layers switch to 0 and 2", 300),  # streamed
    "after-refusal": ("sent after the file asked for a layer the model lacks", 3),
}


class ControlledServer(Server):
    """``vllm serve`` with the live-control endpoints, recording to JSONL and OTLP."""

    def __init__(self, model: str, workdir: Path, otlp_endpoint: str) -> None:
        self.routing = workdir / "routing.jsonl"
        self.control = workdir / "control.json"
        super().__init__(model, workdir, {"VLLM_LOG_MOE": f"otlp,{self.routing}", "VLLM_LOG_MOE_CONTROL": str(self.control),
                                          **otlp_env(otlp_endpoint)},
                         ["--api-key", API_KEY, "--middleware", "otel_moe.control.http.middleware"], api_key=API_KEY)

    def _completion(self, request_id: str, stream: bool = False) -> urllib.request.Request:
        prompt, max_tokens = PROMPTS[request_id]
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return self._request("POST", "/v1/completions", body, self.api_key, {"X-Request-Id": request_id})

    def complete(self, request_id: str) -> dict:
        with urllib.request.urlopen(self._completion(request_id), timeout=120) as response:
            return json.loads(response.read())["usage"]

    def complete_switching(self, request_id: str, switch: dict) -> tuple[dict, tuple]:
        """Stream a completion; once its first token arrived, send ``switch``."""
        answer, usage = None, None
        with urllib.request.urlopen(self._completion(request_id, stream=True), timeout=120) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                usage = chunk.get("usage") or usage
                if answer is None:
                    answer = self.call("POST", "/otel_moe/recording", switch)
        return usage, answer


@pytest.fixture(scope="session")
def controlled_serve(models, tmp_path_factory):
    """One server, one scripted session of control calls and requests; the
    tests read what each call answered and what the server recorded."""
    workdir = tmp_path_factory.mktemp("serve_control")
    collector = CollectorProcess(workdir / "collected")
    try:
        server = ControlledServer(models["qwen2_moe"], workdir, collector.grpc_endpoint)
    except Exception:
        collector.stop()
        raise
    answers, usage = {}, {}
    try:
        answers["status unauthenticated"] = server.call("GET", "/otel_moe/recording", key=None)
        answers["status at start"] = server.call("GET", "/otel_moe/recording")
        usage["before-stop"] = server.complete("before-stop")
        answers["stop"] = server.call("POST", "/otel_moe/recording/stop")
        usage["while-stopped"] = server.complete("while-stopped")
        answers["bad mode"] = server.call("POST", "/otel_moe/recording", {"mode": "bogus"})
        answers["bad field"] = server.call("POST", "/otel_moe/recording", {"layer": "1"})
        answers["huge range"] = server.call("POST", "/otel_moe/recording", {"layers": "0-20000000"})
        answers["not utf-8"] = server.call("POST", "/otel_moe/recording", b'{"mode": "\xff"}')
        answers["deep"] = server.call("POST", "/otel_moe/recording", b"[" * 100000 + b"]" * 100000)
        answers["start counts 1,3"] = server.call("POST", "/otel_moe/recording/start", {"layers": "1,3", "mode": "counts"})
        usage["counts-1-3"] = server.complete("counts-1-3")
        answers["tokens all"] = server.call("POST", "/otel_moe/recording", {"layers": "all", "mode": "tokens"})
        usage["tokens-again"] = server.complete("tokens-again")
        usage["across-switch"], answers["layers 0,2"] = server.complete_switching("across-switch", {"layers": "0,2"})
        answers["unknown endpoint"] = server.call("POST", "/otel_moe/recording/pause")
        answers["layers 7"] = server.call("POST", "/otel_moe/recording", {"layers": "7"})
        # written past the endpoint's check: the worker refuses it, keeps layers 0,2 and says why
        server.control.write_text('{"recording": true, "layers": "7", "mode": "tokens"}\n')
        usage["after-refusal"] = server.complete("after-refusal")
        answers["status after refusal"] = server.call("GET", "/otel_moe/recording")
        answers["restore 0,2"] = server.call("POST", "/otel_moe/recording", {"layers": "0,2"})
    finally:
        returncode = server.stop()
        assert collector.stop() == 0
    return server, answers, usage, returncode


def _name(request_id: str) -> str:
    """cmpl-<X-Request-Id>-<prompt index> -> the X-Request-Id."""
    return request_id.removeprefix("cmpl-").rsplit("-", 1)[0]


def _rows(server) -> list[dict]:
    return [json.loads(line) for line in server.routing.read_text().splitlines()]


def _tokens(usage: dict) -> int:
    # every prompt token and every generated token but the last goes through the model
    return usage["prompt_tokens"] + usage["completion_tokens"] - 1


def test_control_endpoints_answer_the_state_or_a_named_error(controlled_serve):
    server, answers, _, returncode = controlled_serve
    assert returncode == 0, "".join(server.lines[-40:])
    assert answers["status unauthenticated"][0] == 401
    assert asked(answers["status at start"]) == (200, {"recording": True, "layers": "all", "mode": "tokens"})
    # the one recording worker answers what it applied
    [worker] = answers["status at start"][1]["workers"]
    assert worker["pid"] != server.proc.pid and worker["dp_rank"] == 0 and worker["moe_layers"] == "0-3"
    assert {k: worker[k] for k in ("recording", "layers", "mode", "version", "refused")} == {
        "recording": True, "layers": "all", "mode": "tokens", "version": 0, "refused": None}
    assert asked(answers["stop"]) == (200, {"recording": False, "layers": "all", "mode": "tokens"})
    assert answers["bad mode"][0] == 400 and "mode='bogus' is invalid; allowed: tokens or counts" in answers["bad mode"][1]["error"]
    assert answers["bad field"][0] == 400 and "unknown field(s) ['layer']" in answers["bad field"][1]["error"]
    assert answers["huge range"][0] == 400 and "layer indices up to 4095" in answers["huge range"][1]["error"]
    assert answers["not utf-8"] == (400, {"error": "otel-moe: the request body is not UTF-8"})
    assert answers["deep"] == (400, {"error": "otel-moe: the request body is nested too deeply"})
    assert asked(answers["start counts 1,3"]) == (200, {"recording": True, "layers": "1,3", "mode": "counts"})
    assert asked(answers["tokens all"]) == (200, {"recording": True, "layers": "all", "mode": "tokens"})
    assert asked(answers["layers 0,2"]) == (200, {"recording": True, "layers": "0,2", "mode": "tokens"})
    assert answers["unknown endpoint"][0] == 404
    # layers no worker has are refused once the workers have said which they have
    assert answers["layers 7"] == (400, {"error": "otel-moe: request: layers='7': the model has no MoE layer 7 "
                                                  "(its MoE layers, as its recording workers report: 0-3)"})
    status, body = answers["status after refusal"]
    assert status == 200 and body["layers"] == "7"  # asked
    [worker] = body["workers"]
    assert worker["layers"] == "0,2" and worker["version"] == 4  # applied
    assert "layers='7' is invalid" in worker["refused"] and "the model has no MoE layer [7]" in worker["refused"]
    assert answers["restore 0,2"][0] == 200
    # the file keeps only what was set, so the flags still decide the rest
    assert json.loads(server.control.read_text()) == {"recording": True, "layers": "0,2", "mode": "tokens"}
    refusals = [line for line in server.lines if "layers='7'" in line and "otel-moe" in line]
    assert refusals and all(line.count("otel-moe:") == 1 for line in refusals)


def asked(answer: tuple[int, dict]) -> tuple[int, dict]:
    """An answer's status and what the control file asks for (without the workers' answers)."""
    status, body = answer
    return status, {k: v for k, v in body.items() if k != "workers"}


def test_recording_follows_the_control_calls(controlled_serve):
    server, _, usage, _ = controlled_serve
    rows = _rows(server)
    token_rows = [r for r in rows if "expert_ids" in r]
    count_rows = [r for r in rows if "counts" in r]
    positions = defaultdict(lambda: defaultdict(list))  # request -> layer -> positions
    for r in token_rows:
        positions[_name(r["request_id"])][r["layer"]].append(r["position"])
    # nothing while stopped; requests recorded in tokens mode are exact, on every layer asked for
    assert set(positions) == {"before-stop", "tokens-again", "across-switch", "after-refusal"}
    assert sorted(positions["after-refusal"]) == [0, 2]  # recorded as before the refused change
    for name in ("before-stop", "tokens-again"):
        assert sorted(positions[name]) == [0, 1, 2, 3]
        for layer_positions in positions[name].values():
            assert sorted(layer_positions) == list(range(_tokens(usage[name])))
    # counts mode, layers 1 and 3 only, covers exactly the tokens of the one request sent then
    assert {r["layer"] for r in count_rows} == {1, 3}
    for layer in (1, 3):
        layer_rows = [r for r in count_rows if r["layer"] == layer]
        assert sum(r["num_tokens"] for r in layer_rows) == _tokens(usage["counts-1-3"])
        assert all(sum(r["counts"]) == 2 * r["num_tokens"] for r in layer_rows)  # top_k = 2
    # switched to layers 0 and 2 mid-request: those two layers stay whole, 1 and 3 stop at the switch
    across = positions["across-switch"]
    for layer in (0, 2):
        assert sorted(across[layer]) == list(range(_tokens(usage["across-switch"])))
    assert sorted(across[1]) == sorted(across[3]) == list(range(len(across[1])))
    assert 0 < len(across[1]) < _tokens(usage["across-switch"])
    # steps are numbered only while recording: one run of indices, no gap for the stopped part
    # (a counts row stands for its window of steps, step..last_step)
    covered = {r["step"] for r in token_rows} | {s for r in count_rows for s in range(r["step"], r["last_step"] + 1)}
    assert sorted(covered) == list(range(len(covered)))
    applied = [line for line in server.lines if "otel-moe: control: recording is now" in line]
    assert len(applied) == 4  # stop, start counts, tokens all, layers 0,2 (refused calls never reached the file)


def test_request_spans_say_which_requests_control_cut(controlled_serve):
    server, _, usage, _ = controlled_serve
    spans = list(read.iter_collector_spans([str(server.workdir / "collected")]))
    requests = {_name(s.attributes[schema.REQUEST_ID]): s.attributes for s in spans if s.name == schema.REQUEST_SPAN}
    # a request sent while stopped left no trace; one cut by a switch says so
    assert set(requests) == {"before-stop", "counts-1-3", "tokens-again", "across-switch", "after-refusal"}
    assert [n for n, a in requests.items() if a.get(schema.REQUEST_PARTIAL)] == ["across-switch"]
    across = requests["across-switch"]
    assert across[schema.LAYERS] == [0, 2]  # the layers recorded at the end, their counts whole
    counts = schema.decode_counts(across)
    assert counts.sum(axis=1).tolist() == [2 * _tokens(usage["across-switch"])] * 2
    modes = {read.decode_step(s).step: s.attributes[schema.MODE] for s in spans if s.name == schema.STEP_SPAN}
    jsonl_modes = {r["step"]: "counts" if "counts" in r else "tokens" for r in _rows(server)}
    assert modes == jsonl_modes and set(modes.values()) == {"tokens", "counts"}

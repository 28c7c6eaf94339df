"""Bad input never gives a traceback: a bad record is skipped and counted by
reason (only it, not its neighbours), every CLI error is one line with exit 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_report import GOLDEN, LAYER0, LAYER1, _attr, golden_jsonl, golden_otlp_line, u32

from otel_moe import schema
from otel_moe.cli import build_parser
from otel_moe.report.main import build_report

STEP0_LAYER0 = [3, 1, 1, 1]  # a@0 0+1, a@1 0+2, b@0 0+3
STEP0_LAYER1 = [1, 1, 3, 1]  # 2+3, 2+0, 1+2


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "otel_moe.cli", *args], capture_output=True, text=True, **kwargs)


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tampered(span_name: str, change, step: int = 1) -> str:
    """The golden collector line with ``change(attributes)`` applied to one span's
    attribute list (step ``step`` of moe.step, or request "a"'s llm_request)."""
    request = json.loads(golden_otlp_line())
    for span in request["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        attrs = {kv["key"]: kv for kv in span["attributes"]}
        if span["name"] == span_name == schema.STEP_SPAN and attrs[schema.STEP_INDEX]["value"]["intValue"] == str(step):
            change(span)
        elif span["name"] == span_name == schema.VLLM_REQUEST_SPAN and attrs[schema.REQUEST_ID]["value"]["stringValue"] == "a":
            change(span)
    return json.dumps(request) + "\n"


class RawValue(dict):
    """An OTLP/JSON AnyValue written as is."""


def set_attr(span: dict, key: str, value) -> None:
    new = {"key": key, "value": dict(value)} if isinstance(value, RawValue) else _attr(key, value)
    span["attributes"] = [kv for kv in span["attributes"] if kv["key"] != key] + [new]


def set_event_attr(span: dict, key: str, value) -> None:
    event = span["events"][0]  # layer 0's
    event["attributes"] = [kv for kv in event["attributes"] if kv["key"] != key] + [_attr(key, value)]


def set_layer0_ids(span: dict, ids: bytes) -> None:
    set_event_attr(span, schema.EXPERT_IDS, ids)


BAD_STEPS = {
    "expert id out of range": lambda span: set_layer0_ids(span, bytes([1, 0, 9, 2])),
    "num_experts not an integer in range": lambda span: set_attr(span, schema.NUM_EXPERTS, 10**12),
    "request_tokens do not match the rows": lambda span: set_attr(span, schema.REQUEST_TOKENS, u32([5, 5])),
    "per-request arrays differ in length": lambda span: set_attr(span, schema.REQUEST_PROMPT_LENS, u32([2])),
    "malformed span": lambda span: set_attr(span, schema.STEP_INDEX, RawValue({"intValue": "not a number"})),
    "malformed moe.step span": lambda span: set_event_attr(span, schema.EXPERT_WEIGHTS_DTYPE, "<i2"),
}


@pytest.mark.parametrize("reason", sorted(BAD_STEPS))
def test_a_bad_step_is_skipped_alone_and_counted(tmp_path, reason):
    (tmp_path / "traces.json").write_text(tampered(schema.STEP_SPAN, BAD_STEPS[reason]))
    summary = build_report([str(tmp_path)], str(tmp_path / "out"), figures=False)
    assert [k for k in summary["inputs"]["skipped_records"]] == [
        reason if reason == "malformed span" else f"moe.step: {reason}"]
    assert summary["layers"]["0"]["counts"] == STEP0_LAYER0  # step 0 of the same line is kept
    assert summary["layers"]["1"]["counts"] == STEP0_LAYER1
    assert summary["requests"]["a"]["e2e_s"] == 0.5  # so are the latency spans after it


@pytest.mark.parametrize("value", [{"stringValue": "slow"}, {"doubleValue": "NaN"}, {"doubleValue": "Infinity"}])
def test_bad_latency_is_skipped_and_summary_stays_strict_json(tmp_path, value):
    def change(span):
        set_attr(span, schema.VLLM_E2E, RawValue(value))

    (tmp_path / "traces.json").write_text(tampered(schema.VLLM_REQUEST_SPAN, change))
    summary = build_report([str(tmp_path)], str(tmp_path / "out"), figures=False)
    assert summary["inputs"]["skipped_records"] == {"llm_request: e2e latency not a finite number of seconds": 1}
    assert summary["requests"]["a"]["e2e_s"] is None and summary["requests"]["b"]["e2e_s"] == 0.25
    assert summary["layers"]["0"]["counts"] == LAYER0

    def refuse(constant):
        raise AssertionError(f"{constant} in summary.json")

    json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=refuse)


def test_one_bad_jsonl_row_costs_only_itself(tmp_path):
    golden_jsonl(tmp_path / "routing.jsonl")
    rows = (tmp_path / "routing.jsonl").read_text().splitlines()
    # rows: (step, request, position) x layers 0, 1 in GOLDEN order; row 2 = step 0, a@1, layer 0: ids 0+2
    bad = json.loads(rows[2])
    assert (bad["step"], bad["request_id"], bad["position"], bad["layer"]) == (0, "a", 1, 0)
    bad["expert_ids"] = [0.0, 2.5]
    rows[2] = json.dumps(bad)
    rows.insert(5, "{not json")
    rows.insert(6, "[" * 100000 + "]" * 100000)  # deeper than the JSON parser goes
    (tmp_path / "routing.jsonl").write_text("\n".join(rows) + "\n")
    summary = build_report([str(tmp_path / "routing.jsonl")], str(tmp_path / "out"), figures=False)
    assert summary["inputs"]["bad_lines"] == 2
    assert summary["inputs"]["skipped_records"] == {"expert id out of range": 1}
    assert summary["layers"]["0"]["counts"] == [LAYER0[0] - 1, LAYER0[1], LAYER0[2] - 1, LAYER0[3]]
    assert summary["layers"]["1"]["counts"] == LAYER1
    assert summary["layers"]["0"]["tokens"] == len(GOLDEN) - 1 and summary["layers"]["1"]["tokens"] == len(GOLDEN)


@pytest.mark.parametrize("field,value,reason", [
    ("phase", "middle", "phase neither prefill nor decode"),
    ("position", -1, "position not an integer in range"),
    ("expert_weights", [0.5], "expert_weights not one number per expert id"),
    ("num_experts", 2, "expert id out of range"),  # ids up to 3
    ("layer", 99999, "layer not an integer in range"),
    ("request_id", 7, "request_id not a string"),
])
def test_jsonl_row_checks(tmp_path, field, value, reason):
    golden_jsonl(tmp_path / "routing.jsonl")
    rows = (tmp_path / "routing.jsonl").read_text().splitlines()
    row = json.loads(rows[-1])  # step 1, b@1, layer 1: ids 2+1
    row[field] = value
    rows[-1] = json.dumps(row)
    (tmp_path / "routing.jsonl").write_text("\n".join(rows) + "\n")
    summary = build_report([str(tmp_path / "routing.jsonl")], str(tmp_path / "out"), figures=False)
    assert summary["inputs"]["skipped_records"] == {reason: 1}
    assert summary["layers"]["1"]["counts"] == [LAYER1[0], LAYER1[1] - 1, LAYER1[2] - 1, LAYER1[3]]


def test_report_never_reads_its_own_outputs_or_folders_named_json(tmp_path):
    (tmp_path / "traces.json").write_text(golden_otlp_line())
    (tmp_path / "old.json").mkdir()
    first = build_report([str(tmp_path)], str(tmp_path), figures=False)  # written into its own input folder
    second = build_report([str(tmp_path)], str(tmp_path), figures=False)
    assert first["inputs"]["files"] == second["inputs"]["files"] == [str(tmp_path / "traces.json")]
    assert second["inputs"]["bad_lines"] == 0 and second["layers"]["0"]["counts"] == LAYER0


def test_no_records_names_what_was_read(tmp_path):
    (tmp_path / "notes.json").write_text("hello\n")
    one_line_error(cli("report", str(tmp_path / "notes.json"), "--out", str(tmp_path / "o")),
                   f"read 1 file(s) ({tmp_path / 'notes.json'}), 1 lines", "1 not JSON objects", "collector's --out folder")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")),
                   "no .json or .jsonl files in the input")
    one_line_error(cli("summary", str(tmp_path / "empty")), "otel-moe summary: error: no otel-moe routing records")


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "traces.json").write_text(golden_otlp_line())
    (tmp_path / "a-file").write_text("")
    one_line_error(cli("report", str(tmp_path), "--out", str(tmp_path / "a-file")), "--out", "is a file, not a folder")
    one_line_error(cli("report", str(tmp_path), "--out", str(tmp_path / "o"), "--moe-kernels", "("),
                   "--moe-kernels", "not a regular expression")
    one_line_error(cli("report", str(tmp_path), "--out", str(tmp_path / "o"), "--layers", "0-20000000"), "--layers")
    one_line_error(cli("control", "start", "--file", str(tmp_path / "missing" / "control.json")),
                   "cannot use --file", "No such file or directory")
    for layers in ("-2", "0", "two"):
        one_line_error(cli("tiny-model", str(tmp_path / "m"), "--layers", layers), "--layers", "whole number >= 1")
    assert not (tmp_path / "m").exists()
    one_line_error(cli("report", "--out", str(tmp_path / "o")), "the following arguments are required: inputs")
    one_line_error(cli("compare", str(tmp_path), str(tmp_path / "missing"), "--out", str(tmp_path / "c")), "no such input")


def test_version_and_help_for_every_option():
    from importlib.metadata import version

    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"otel-moe {version('otel-moe')}"
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"report", "summary", "compare", "collector", "control", "tiny-model"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"otel-moe {name} {action.option_strings or action.dest} has no help text"


def test_summary_into_a_closed_pipe_is_quiet(tmp_path):
    (tmp_path / "traces.json").write_text(golden_otlp_line())
    proc = subprocess.Popen([sys.executable, "-m", "otel_moe.cli", "summary", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader (`| head`) is gone before the first line
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err


@pytest.mark.parametrize("raw", [b'{"a": [1, 2.5, "x"], "b": {"c": null}}', b'{"a": NaN}', b'[1e400]', b'"\\ud800"',
                                 b'{"a": 1, "a": 2}', b"12345678901234567890123"])
def test_lines_read_as_json_loads_reads_them(raw):
    # msgspec reads what it can; json.loads what it refuses: the same values either way
    import math

    from otel_moe.report.read import parse_line

    got, want = parse_line(raw), json.loads(raw)
    assert repr(got) == repr(want) or (isinstance(want, dict) and math.isnan(got["a"]) and math.isnan(want["a"]))


@pytest.mark.parametrize("raw", [b'{"a": 1} x', b"{", b""])
def test_lines_json_loads_refuses_are_refused_with_its_error(raw):
    from otel_moe.report.read import parse_line

    with pytest.raises(json.JSONDecodeError):
        parse_line(raw)


@pytest.mark.parametrize("text", ["AAECAwQF", "AAEC\nAwQF", "AA EC AwQF", "AAECAw==", "", "AAECAw"])
def test_base64_reads_as_the_standard_library_reads_it(text):
    import base64
    import binascii

    try:
        want = base64.b64decode(text)
    except binascii.Error:
        with pytest.raises(binascii.Error):
            schema.b64decode(text)
        return
    assert schema.b64decode(text) == want


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_file_lines_are_the_lines_iterating_the_file_gives(tmp_path, monkeypatch, chunk):
    # lines longer than a read, ending at a read's edge, empty ones, and a last line without newline
    from otel_moe.report import read

    monkeypatch.setattr(read, "READ_CHUNK", chunk)
    data = b'{"a": 1}\n\n' + b"x" * 20 + b"\n" + b"abcdef\n" + b"tail without newline"
    path = tmp_path / "lines.json"
    for content in (data, data + b"\n", b"", b"\n", b"one"):
        path.write_bytes(content)
        with open(path, "rb") as f:
            got = [bytes(line) for line in read.file_lines(f)]
        with open(path, "rb") as f:
            assert got == list(f)

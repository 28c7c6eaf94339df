"""README's CPU serving recipe, run as written (bash, from a fresh folder): the
commands a new user copies must work, and what they leave must be right."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env

from otel_moe import schema
from otel_moe.report import read

pytestmark = pytest.mark.vllm  # the recipe starts a server
README = Path(__file__).parent.parent / "README.md"


def recipe() -> str:
    block = re.search(r"<!-- cpu-serving-recipe -->\n```bash\n(.*?)```\n<!-- end -->", README.read_text(), re.S)
    assert block, "README has no cpu-serving-recipe block"
    return block.group(1)


def test_the_cpu_serving_recipe_runs_as_written(tmp_path):
    for leftover in ("/tmp/moe-model", "/tmp/moe-control.json", "/tmp/moe-control.json.workers"):
        shutil.rmtree(leftover, ignore_errors=True) if os.path.isdir(leftover) else Path(leftover).unlink(missing_ok=True)
    env = clean_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # this venv's python and otel-moe
    proc = subprocess.run(["bash", "-e", "-c", recipe()], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # the answers curl printed: two completions, the status with its worker, the switch
    answers = json_objects(proc.stdout)  # among vLLM's own log lines; curl adds no newline
    completions = [a for a in answers if a.get("object") == "text_completion"]
    assert len(completions) == 2
    status, switched = [a for a in answers if "workers" in a]  # (the log also shows control states)
    [worker] = status["workers"]
    assert (worker["recording"], worker["mode"], worker["refused"]) == (True, "tokens", None)
    assert switched["mode"] == "counts"
    # the first request recorded token by token, the second as counts; the report read both
    spans = list(read.iter_collector_spans([str(tmp_path / "out" / "collected")]))
    modes = {s.attributes[schema.REQUEST_ID]: s.attributes[schema.MODE] for s in spans if s.name == schema.REQUEST_SPAN}
    assert sorted(modes.values()) == ["counts", "tokens"]
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    # the server's request id is the completion's id and the prompt's index ("cmpl-...-0")
    expected = {f"{c['id']}-0": c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"] - 1 for c in completions}
    assert {r: q["tokens"] for r, q in summary["requests"].items()} == expected
    assert (tmp_path / "out" / "report" / "report.html").exists()


def json_objects(text: str) -> list[dict]:
    """Every JSON object in ``text`` that starts with a quoted key, in order."""
    found, decoder, at = [], json.JSONDecoder(), 0
    while (at := text.find('{"', at)) >= 0:
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at += 1
            continue
        found.append(value)
        at = end
    return found

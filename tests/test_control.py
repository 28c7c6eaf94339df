"""The live-control file: what it accepts, what it refuses, and that every
change is seen once, however quickly changes follow each other."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import clean_env

from otel_moe.config import ConfigError, from_env, parse_layers
from otel_moe.control import ControlError, ControlFile, ControlState, ControlWatcher
from otel_moe.control.workers import WorkerReport
from otel_moe.control.workers import folder as workers_folder

BASE = ControlState(True, parse_layers("all"), "tokens")


@pytest.mark.parametrize("changes, named", [
    ({"recording": "yes"}, "recording='yes' is invalid; allowed: true or false"),
    ({"mode": "bogus"}, "mode='bogus' is invalid; allowed: tokens or counts"),
    ({"layers": "3-1"}, "layers='3-1' is invalid"),
    ({"layers": 3}, "layers=3 is invalid"),
    ({"layerz": "1"}, "unknown field(s) ['layerz']"),
])
def test_bad_values_are_refused_naming_the_field(changes, named, tmp_path):
    control = ControlFile(str(tmp_path / "control.json"))
    with pytest.raises(ControlError) as err:
        control.update(changes, BASE)
    assert named in str(err.value)
    assert not (tmp_path / "control.json").exists()  # nothing written


def test_the_file_keeps_only_what_was_set(tmp_path):
    control = ControlFile(str(tmp_path / "control.json"))
    assert control.update({"recording": False}, BASE) == ControlState(False, parse_layers("all"), "tokens")
    assert control.update({"layers": [1, 3]}, BASE).layers == parse_layers("1,3")
    assert json.loads((tmp_path / "control.json").read_text()) == {"recording": False, "layers": "1,3"}
    # the flags (base) still decide what the file never set
    counts_base = ControlState(True, parse_layers("0"), "counts")
    assert control.read(counts_base) == ControlState(False, parse_layers("1,3"), "counts")


def test_watcher_sees_every_change_even_within_one_timestamp_tick(tmp_path):
    path = str(tmp_path / "control.json")
    watcher = ControlWatcher(path, BASE)
    assert watcher.state == BASE and not watcher.poll()
    control = ControlFile(path)
    control.update({"recording": False}, BASE)
    assert watcher.poll() and watcher.state.recording is False
    # two writes back to back: same mtime on coarse clocks, but a new inode each time
    control.update({"recording": True}, BASE)
    assert watcher.poll() and watcher.state.recording is True
    control.update({"mode": "counts"}, BASE)
    assert watcher.poll() and watcher.state.mode == "counts"
    assert not watcher.poll() and watcher.version == 3
    control.update({"mode": "counts"}, BASE)  # rewritten, same content: no change to apply
    assert not watcher.poll() and watcher.version == 3


def test_a_file_gone_bad_keeps_the_last_good_state(tmp_path, caplog):
    path = tmp_path / "control.json"
    watcher = ControlWatcher(str(path), BASE)
    path.write_text('{"recording": fal')
    assert not watcher.poll() and watcher.state == BASE
    assert "is not JSON" in caplog.text
    os.unlink(path)  # removed: back to what the flags say
    path.write_text('{"recording": false}')
    assert watcher.poll() and not watcher.state.recording


def test_watcher_refuses_a_bad_file_at_start(tmp_path):
    path = tmp_path / "control.json"
    path.write_text('{"layers": "9"}')

    def only_layers_0_to_3(state):
        state.layers.check_against({0, 1, 2, 3})

    with pytest.raises(ConfigError) as err:
        ControlWatcher(str(path), BASE, validate=only_layers_0_to_3)
    assert f"control file {path}: layers='9' is invalid; allowed: MoE layers of this model (0-3)" in str(err.value)


def test_control_variable_must_name_a_file_in_an_existing_folder(tmp_path):
    with pytest.raises(ConfigError) as err:
        from_env({"VLLM_LOG_MOE": "otlp", "VLLM_LOG_MOE_CONTROL": str(tmp_path / "nowhere" / "c.json")})
    assert "VLLM_LOG_MOE_CONTROL=" in str(err.value)
    with pytest.raises(ConfigError):
        from_env({"VLLM_LOG_MOE": "otlp", "VLLM_LOG_MOE_CONTROL": str(tmp_path)})
    assert from_env({"VLLM_LOG_MOE": "otlp", "VLLM_LOG_MOE_CONTROL": str(tmp_path / "c.json")}).control_path


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otel_moe.cli", "control", *args], env=clean_env(**env),
                          capture_output=True, text=True, timeout=60)


def test_cli(tmp_path):
    path = str(tmp_path / "control.json")
    no_workers = {"workers": []}
    assert json.loads(_cli("status", VLLM_LOG_MOE_CONTROL=path).stdout) == {"recording": True, "layers": "all",
                                                                            "mode": "tokens", **no_workers}
    assert json.loads(_cli("stop", "--file", path).stdout)["recording"] is False
    out = _cli("set", "--layers", "0-2", "--mode", "counts", "--file", path)
    assert json.loads(out.stdout) == {"recording": False, "layers": "0-2", "mode": "counts", **no_workers}
    bad = _cli("set", "--layers", "x", "--file", path)
    assert bad.returncode == 2 and "layers='x' is invalid" in bad.stderr
    assert _cli("start").returncode == 2  # no file named anywhere
    assert json.loads(_cli("start", "--file", path).stdout) == {"recording": True, "layers": "0-2", "mode": "counts",
                                                                **no_workers}
    # a worker (this test's process stands in for one) answers; the status shows it and layers it lacks are refused
    watcher = ControlWatcher(path, BASE, validate=_layers_0_to_3, report=WorkerReport(path, 0, [0, 1, 2, 3]))
    [worker] = json.loads(_cli("status", "--file", path).stdout)["workers"]
    assert worker == {"pid": os.getpid(), "host": socket.gethostname(), "dp_rank": 0, "moe_layers": "0-3",
                      "recording": True, "layers": "0-2", "mode": "counts", "version": 0, "refused": None}
    missing = _cli("set", "--layers", "2-5", "--file", path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("otel-moe: request: layers='2-5': the model has no MoE layer 4-5 (its MoE layers, "
                                      "as its recording workers report: 0-3)")
    watcher.close()
    assert json.loads(_cli("status", "--file", path).stdout)["workers"] == []


def _layers_0_to_3(state):
    state.layers.check_against({0, 1, 2, 3})


def test_each_worker_answers_what_it_applied_and_what_it_refused(tmp_path, caplog):
    path = str(tmp_path / "control.json")
    control = ControlFile(path)
    watcher = ControlWatcher(path, BASE, validate=_layers_0_to_3, report=WorkerReport(path, 1, [0, 1, 2, 3]))
    assert control.status(BASE)["workers"][0]["dp_rank"] == 1
    control.update({"mode": "counts"}, BASE)
    assert watcher.poll()
    [answer] = control.status(BASE)["workers"]
    assert (answer["mode"], answer["version"], answer["refused"]) == ("counts", 1, None)
    # a file written past the API's check (by hand, or before the workers answered) asks for layer 7
    (tmp_path / "control.json").write_text('{"layers": "7", "mode": "counts"}')
    assert not watcher.poll()
    [answer] = control.status(BASE)["workers"]
    assert answer["layers"] == "all" and answer["mode"] == "counts"  # it keeps what it had
    assert answer["refused"] == (f"control file {path}: layers='7' is invalid; allowed: MoE layers of this model "
                                 "(0-3); the model has no MoE layer [7]")
    assert control.status(BASE)["layers"] == "7"  # what was asked, beside what was applied
    [line] = [r.getMessage() for r in caplog.records if "layers='7'" in r.getMessage()]
    assert line.startswith("otel-moe: control file ") and line.count("otel-moe:") == 1
    (tmp_path / "control.json").write_text('{"mode": "counts"}')  # asked again for what it has
    assert not watcher.poll()
    assert control.status(BASE)["workers"][0]["refused"] is None


def test_a_dead_workers_answer_is_not_listed(tmp_path):
    path = str(tmp_path / "control.json")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    report = WorkerReport(path, 0, [0, 1])
    report.identity["pid"] = int(dead.stdout)
    report.write(BASE.as_json(), 0, None)
    assert os.listdir(workers_folder(path)) and ControlFile(path).status(BASE)["workers"] == []
    ControlFile(path).update({"layers": "5"}, BASE)  # no live worker has answered: nothing to check against

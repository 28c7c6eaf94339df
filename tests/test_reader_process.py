"""The report's input read in a second process (reader_process): the same summary as
reading in place, the same counts of what was skipped, the same errors, and no reader
left behind when the aggregation stops early."""
from __future__ import annotations

import json

import pytest
from test_report import golden_jsonl, golden_otlp_line

from otel_moe.report import reader_process
from otel_moe.report.main import build_report
from otel_moe.report.read import LineStats, SchemaError


def _without_dates(summary: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in summary.items() if k not in ("inputs", "generated")}))


def _inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    lines = [golden_otlp_line(run="run-1").strip(), "garbage", golden_otlp_line(run="run-1").strip()]
    (folder / "traces-2026-01-01T00-00-00.000.json").write_text("\n".join(lines) + "\n")
    golden_jsonl(folder / "routing.jsonl")
    return folder


def test_the_summary_is_the_one_reading_in_place_gives(tmp_path, monkeypatch):
    folder = _inputs(tmp_path)
    summaries = {}
    for name, floor in (("in place", 1 << 60), ("reader process", 0)):
        monkeypatch.setattr(reader_process, "PIPELINE_MIN_BYTES", floor)
        summaries[name] = build_report([str(folder)], str(tmp_path / name), figures=False, run="run-1")
    assert summaries["reader process"]["inputs"] == summaries["in place"]["inputs"]
    assert summaries["in place"]["inputs"]["bad_lines"] == 1 and summaries["in place"]["inputs"]["lines"] > 3
    assert _without_dates(summaries["reader process"]) == _without_dates(summaries["in place"])
    assert summaries["in place"]["requests"]["a"]["tokens"] == 2 * 3  # the third line was read too


def test_items_bytes_and_counts_arrive_in_order(tmp_path, monkeypatch):
    folder = _inputs(tmp_path)
    monkeypatch.setattr(reader_process, "PIPELINE_MIN_BYTES", 0)
    monkeypatch.setattr(reader_process, "ITEMS_PER_MESSAGE", 2)
    read, items = [], {}
    for name, floor in (("reader process", 0), ("in place", 1 << 60)):
        monkeypatch.setattr(reader_process, "PIPELINE_MIN_BYTES", floor)
        stats, sizes = LineStats(), []
        items[name] = [(type(i).__name__, getattr(i, "step", None), getattr(i, "request_id", None))
                       for i in reader_process.read_items([str(folder)], stats, sizes.append)]
        read.append((sum(sizes), stats.lines, stats.bad_lines, dict(stats.skipped)))
    assert items["reader process"] == items["in place"] and len(items["in place"]) > 4
    assert read[0] == read[1] and read[0][0] == sum(f.stat().st_size for f in folder.iterdir())


def test_an_unreadable_schema_fails_as_it_does_in_place(tmp_path, monkeypatch):
    (tmp_path / "traces.json").write_text(golden_otlp_line(version=99) + "\n")
    monkeypatch.setattr(reader_process, "PIPELINE_MIN_BYTES", 0)
    with pytest.raises(SchemaError, match="schema version 99 is not supported"):
        list(reader_process.read_items([str(tmp_path)], LineStats()))
    with pytest.raises(FileNotFoundError):
        list(reader_process.read_items([str(tmp_path / "nothing here")], LineStats()))


def test_a_consumer_that_stops_early_leaves_no_reader(tmp_path, monkeypatch):
    import multiprocessing

    folder = _inputs(tmp_path)
    monkeypatch.setattr(reader_process, "PIPELINE_MIN_BYTES", 0)
    items = reader_process.read_items([str(folder)], LineStats())
    next(items)
    assert [p.name for p in multiprocessing.active_children()] == ["otel-moe-report-reader"]
    items.close()
    assert multiprocessing.active_children() == []


def test_a_process_running_other_threads_reads_in_place(tmp_path, monkeypatch):
    # forking a process with threads may copy a held lock into the child: read in place
    import multiprocessing
    import threading

    folder = _inputs(tmp_path)
    monkeypatch.setattr(reader_process, "PIPELINE_MIN_BYTES", 0)
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        items = reader_process.read_items([str(folder)], LineStats())
        next(items)
        assert multiprocessing.active_children() == []
        items.close()
    finally:
        release.set()
        other.join()

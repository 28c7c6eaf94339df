"""The report's input read in a second process: parsing the JSON lines and decoding
their arrays (a third of the report's CPU on a collector's files) runs beside the
aggregation, which stays in one process and takes the items in the input's order, so
the result is the same as reading in place. The pipe between them holds ~1 MiB (about
a step), so a slow aggregation holds the reader back: memory stays bounded.

Inputs under PIPELINE_MIN_BYTES are read in place (a process costs more than it saves),
and so is everything where the process cannot fork, or cannot fork safely (it runs
other threads: a caller's, in a program that builds reports itself)."""
from __future__ import annotations

import multiprocessing
import os
import threading
from typing import Callable, Iterator

from otel_moe.report.inputs import StepRouting, input_files, stream
from otel_moe.report.read import LineStats

PIPELINE_MIN_BYTES = 64 << 20
ITEMS_PER_MESSAGE = 64  # small items (a request's latency) go in batches; a step goes at once
_ITEMS, _DONE, _FAILED = range(3)


def read_items(paths: list[str], stats: LineStats, on_bytes: Callable[[int], None] = lambda n: None) -> Iterator:
    """``inputs.stream``'s items, in its order, with its counts added to ``stats`` and its
    errors raised here."""
    files = input_files(paths)  # a missing input fails here, before any process starts
    if (sum(os.path.getsize(f) for f in files) < PIPELINE_MIN_BYTES or threading.active_count() > 1
            or "fork" not in multiprocessing.get_all_start_methods()):
        yield from stream(paths, stats, on_bytes)
        return
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    _widen(sending)
    reader = context.Process(target=_read, args=(paths, sending), name="otel-moe-report-reader", daemon=True)
    reader.start()
    sending.close()
    try:
        while True:
            try:
                kind, read_bytes, payload = receiving.recv()
            except EOFError:
                raise RuntimeError(f"the report's reader process ended without finishing (exit code "
                                   f"{reader.join(5) or reader.exitcode}; out of memory?)") from None
            if read_bytes:
                on_bytes(read_bytes)
            if kind == _ITEMS:
                yield from payload
                continue
            counts, error = payload
            _add_counts(stats, counts)
            if kind == _FAILED:
                raise error
            return
    finally:
        receiving.close()
        if reader.is_alive():  # the consumer stopped early, or failed: the reader is not needed
            reader.terminate()
        reader.join()


def _widen(connection) -> None:
    """A pipe of 1 MiB where the system allows it (Linux): a step's message (~0.6 MB)
    goes in a few writes, not a hundred that each wait for the other process."""
    try:
        import fcntl

        fcntl.fcntl(connection.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):
        pass


def _read(paths: list[str], sending) -> None:
    stats, batch, read_bytes = LineStats(), [], 0

    def count(n: int) -> None:
        nonlocal read_bytes
        read_bytes += n

    try:
        for item in stream(paths, stats, count):
            batch.append(item)
            if len(batch) >= ITEMS_PER_MESSAGE or isinstance(item, StepRouting):
                sending.send((_ITEMS, read_bytes, batch))
                batch, read_bytes = [], 0
        if batch:
            sending.send((_ITEMS, read_bytes, batch))
            read_bytes = 0
        sending.send((_DONE, read_bytes, (_counts(stats), None)))
    except Exception as err:  # raised again in the aggregating process, as reading in place would
        try:
            sending.send((_FAILED, read_bytes, (_counts(stats), err)))
        except Exception:  # an error that does not pickle: its type and message
            sending.send((_FAILED, read_bytes, (_counts(stats), RuntimeError(f"{type(err).__name__}: {err}"))))
    finally:
        sending.close()


def _counts(stats: LineStats) -> tuple:
    return stats.lines, stats.bad_lines, dict(stats.skipped)


def _add_counts(stats: LineStats, counts: tuple) -> None:
    lines, bad_lines, skipped = counts
    stats.lines += lines
    stats.bad_lines += bad_lines
    stats.skipped.update(skipped)

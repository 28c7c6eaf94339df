"""The collector's exporter: OTLP/JSON lines into files under one folder.

One Export*ServiceRequest per line, each line written by a single ``write``
and flushed, so a reader (or a crash) sees whole lines, at most the last one
partial. ``traces.json`` (``metrics.json``) is the live file; with rotation it
is renamed ``traces-<UTC time>.json`` (the Collector's naming) once it passes
the size limit.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Optional


class Closed(RuntimeError):
    """The file was closed (the collector stops): nothing more is written."""


class RotatingFile:
    def __init__(self, out_dir: str, rotate_bytes: Optional[int] = None, name: str = "traces") -> None:
        self.out_dir = os.path.realpath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.name = name
        self.path = os.path.join(self.out_dir, f"{name}.json")
        self.rotate_bytes = rotate_bytes
        self._lock = threading.Lock()
        self._fd: Optional[int] = None  # opened by the first line: no empty files
        self._closed = False
        self.lines = 0

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write_line(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                raise Closed()
            if self._fd is None:
                self._fd = self._open()
            os.write(self._fd, data)
            self.lines += 1
            if self.rotate_bytes and os.fstat(self._fd).st_size >= self.rotate_bytes:
                self._rotate()

    def _rotate(self) -> None:
        os.close(self._fd)
        stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime())
        ms = int(time.time() * 1000) % 1000
        target = os.path.join(self.out_dir, f"{self.name}-{stamp}.{ms:03d}.json")
        n = 1
        while os.path.exists(target):  # two rotations in the same millisecond
            target = os.path.join(self.out_dir, f"{self.name}-{stamp}.{ms:03d}-{n}.json")
            n += 1
        os.rename(self.path, target)
        self._fd = self._open()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None

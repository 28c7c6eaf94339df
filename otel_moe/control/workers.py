"""What each recording worker applied: the other half of live control.

The control file says what was asked. Every recording worker answers in a file
of its own beside it, ``<control file>.workers/<host>-<pid>.json``::

    {"pid": 4242, "host": "node1", "dp_rank": 0, "moe_layers": "0-3",
     "recording": true, "layers": "all", "mode": "tokens", "version": 2,
     "refused": null}

written (atomically, by rename) when the worker starts and whenever what it
applies or refuses changes, never per step, and removed when it stops.
``refused`` holds the reason when the file asks for something this worker
cannot record (a layer its model lacks); it then keeps what it had. The HTTP
endpoints and ``otel-moe control status`` list the live workers' answers,
and refuse layers that no live worker has once workers have answered.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from typing import Optional

from otel_moe.config import format_ranges, parse_layers

HOST = socket.gethostname()


def folder(control_path: str) -> str:
    return os.path.abspath(control_path) + ".workers"


class WorkerReport:
    """One worker's answer file (written by that worker's engine thread, on change only)."""

    def __init__(self, control_path: str, dp_rank: int, moe_layers: list[int]) -> None:
        self.folder = folder(control_path)
        self.path = os.path.join(self.folder, f"{HOST}-{os.getpid()}.json")
        self.identity = {"pid": os.getpid(), "host": HOST, "dp_rank": dp_rank, "moe_layers": format_ranges(moe_layers)}

    def write(self, applied: dict, version: int, refused: Optional[str]) -> None:
        """``applied``: the control state's JSON form. An unwritable folder loses only the answer."""
        text = json.dumps({**self.identity, **applied, "version": version, "refused": refused}) + "\n"
        try:
            os.makedirs(self.folder, exist_ok=True)
            replace_atomically(self.path, text)
        except OSError:
            pass

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def replace_atomically(path: str, text: str) -> None:
    """Write a new file and rename it over ``path``: a reader sees the old file or the new
    one, never half of one, and every write is a new inode (a watcher's ``stat`` sees it)."""
    fd, temporary = tempfile.mkstemp(prefix=".otel-moe-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def live_reports(control_path: str) -> list[dict]:
    """The answers of the workers that still run (of this host, by pid; other hosts' as found),
    in (dp rank, pid) order."""
    try:
        names = sorted(os.listdir(folder(control_path)))
    except OSError:
        return []
    reports = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder(control_path), name), encoding="utf-8") as f:
                report = json.load(f)
            pid = int(report["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours
        if report.get("host") == HOST and not _alive(pid):
            continue  # a worker that died without removing its answer
        reports.append(report)
    return sorted(reports, key=lambda r: (r.get("dp_rank", 0), r["pid"]))


def model_layers(reports: list[dict]) -> Optional[frozenset[int]]:
    """The MoE layers the live workers have together (pipeline stages hold parts); None: no answer yet."""
    layers: set[int] = set()
    for report in reports:
        layers |= parse_layers(str(report.get("moe_layers", ""))).layers or set()
    return frozenset(layers) if reports else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True

"""Run the embedded collector as a child process on free loopback ports.

For `make demo`, the benchmarks and the tests: it waits for the collector's
ready line (printed once both receivers listen) instead of sleeping.
"""
from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

READY = re.compile(r"gRPC (\S+):(\d+) OTLP/HTTP \S+:(\d+)")


class CollectorProcess:
    def __init__(self, out_dir: Path | str, *extra_args: str) -> None:
        self.out_dir = Path(out_dir)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otel_moe.cli", "collector", "--out", str(out_dir),
             "--grpc-port", "0", "--http-port", "0", *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        match = READY.search(ready)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"the collector did not start: {ready!r} {self.proc.stderr.read()}")
        self.host, self.grpc_port, self.http_port = match.group(1), int(match.group(2)), int(match.group(3))
        prometheus = re.search(r"Prometheus \S+:(\d+)", ready)
        self.prometheus_port = int(prometheus.group(1)) if prometheus else None
        # Its pipes are drained for as long as it runs: a full pipe would block the collector's next write.
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        for pipe in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._drain, args=(pipe,), daemon=True).start()

    def _drain(self, pipe) -> None:
        for line in pipe:
            self.output.append(line)

    @property
    def grpc_endpoint(self) -> str:
        return f"http://{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal it (SIGTERM: flush and exit) and wait; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

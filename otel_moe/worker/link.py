"""The worker's side of its exporter process: start it, hand it messages, hear it die.

Everything here runs on vLLM's engine thread, and nothing waits. ``send`` encodes a
message and writes it to the socket; when the socket's buffer is full (the exporter
is behind) the bytes wait in a bounded backlog that goes first at the next send,
and past that the message is dropped and counted. ``free_finished_steps`` reads
the exporter's acknowledgements (non-blocking, every so many steps and when the
ring is full).

There is no thread of otel-moe's in vLLM's process. One that published messages
(waiting on each step's CUDA event, then encoding and sending) held the GIL that
vLLM's engine thread wants nearly all of a GPU step, several times a step: a
Python thread taking the GIL back from a busy one costs that one more than doing
the work itself (measured on the 2-core CPU machine, a 256-request
step message: +366-462 us a step through a thread, +118-167 us encoded and sent by
the loop itself). On CUDA a step's message goes before its device copy has landed;
the exporter waits for the copy's mark in the ring (otel_moe.wire.ring).

If the exporter dies (killed, crashed), one line says so, and recording stops:
the engine keeps serving with nothing changed but the missing telemetry.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any, Optional

from otel_moe.wire import messages, ring
from otel_moe.wire.messages import ACK, CLOSE, SKIP, Message, as_tuple
from otel_moe.wire.ring import FifoSpace, SharedRing

logger = logging.getLogger("vllm.otel_moe")
COMMAND = "exporter"  # ``python -m otel_moe exporter ...``: what `ps` shows


class ExporterLink:
    def __init__(self, spec: dict, ring_bytes: int, backlog_messages: int) -> None:
        """Called on the engine thread (its CPUs are the ones the exporter leaves).
        ``spec``: what the exporter process needs to know (see exporter.receiver);
        ``backlog_messages``: how many messages may wait for room in the socket."""
        self.ring = SharedRing(ring_bytes)
        self.space = FifoSpace(ring_bytes)
        self.sock, theirs = ring.socket_pair()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        # Larger messages are dropped: half the socket's buffer (the kernel refuses a little
        # under all of it, and net.core.wmem_max may have cut it), and what the exporter reads whole.
        self.max_message = min(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2, messages.MAX_MESSAGE)
        spec = {**spec, "socket_fd": theirs.fileno(), "ring_fd": self.ring.fd, "ring_bytes": ring_bytes,
                "parent_pid": os.getpid(), "engine_cpus": sorted(os.sched_getaffinity(0))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otel_moe", COMMAND, "--spec", json.dumps(spec)],
            pass_fds=(theirs.fileno(), self.ring.fd), stdin=subprocess.DEVNULL, close_fds=True)
        theirs.close()
        self.alive = True
        self.dropped_messages = 0
        self._backlog: "collections.deque[bytes]" = collections.deque()  # oldest first
        self._backlog_limit = backlog_messages
        self._said_dead = False

    def has_room(self) -> bool:
        """Would a message go now (or wait in the backlog)? Asked before a step's copy
        into the ring, so that copies are only made for messages that can go."""
        return self.alive and len(self._backlog) < self._backlog_limit

    def send(self, message: Message) -> bool:
        """Encode and hand on a message, never waiting; False when it was dropped
        (no room, or a layout too large for one message)."""
        data = _encoded(as_tuple(message)) if self.has_room() else b""  # no encoding for a message that cannot go
        if not data or len(data) > self.max_message:
            self.dropped_messages += 1
            return False
        return self._write(data)

    def skip(self) -> None:
        """In place of a message that held ring space and could not go: the exporter
        acknowledges that space, so the FIFO frees each reservation in order. It goes
        even past the backlog's bound (it is tiny, and follows a message that did not go)."""
        if self.alive:
            self._write(messages.encode((SKIP,)))

    def _write(self, data: bytes) -> bool:
        """Send, or keep in the backlog behind what waits already (the exporter is
        behind: its socket's buffer is full); False when the exporter is gone."""
        self._backlog.append(data)
        return self._write_backlog()

    def _write_backlog(self, deadline: Optional[float] = None) -> bool:
        """Send what waits, oldest first, until the socket is full (or, with a
        ``deadline``, waiting for room until then); False when the exporter is gone."""
        while self._backlog:
            try:
                if deadline is None:
                    self.sock.send(self._backlog[0], socket.MSG_DONTWAIT)
                else:
                    self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                    self.sock.send(self._backlog[0])
            except (BlockingIOError, TimeoutError):
                return True
            except OSError:
                self._died()
                self._backlog.clear()
                return False
            self._backlog.popleft()
        return True

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
        """Hand on what waits, ask the exporter to flush and exit; wait at most
        ``timeout_s`` in all. True when it exited."""
        deadline = time.monotonic() + timeout_s
        if self.alive:
            self._backlog.append(messages.encode((CLOSE,)))
            self._write_backlog(deadline)
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            # it finishes its flush on its own (bounded there too), after this process is gone
            return False
        finally:
            self.sock.close()


def _encoded(message: tuple) -> bytes:
    try:
        return encode_message(message)
    except Exception:  # what no vLLM has handed us yet: lose the message, not the step
        return b""


CHECKED_MESSAGES = 64  # the first messages of a process are checked to decode as they were
_checked = 0
_convert_all = False  # vLLM's types do not change within a process: once one needs it, all are converted


def encode_message(message: tuple) -> bytes:
    """A message's bytes, plain lists, ints and strings made of whatever vLLM handed us.
    marshal refuses subclasses of dict or list, and writes anything with a buffer (a
    numpy int, say) as bytes, silently: the first messages are decoded again to see that."""
    global _checked
    if _convert_all:
        return messages.encode(_plain(message))
    try:
        data = messages.encode(message)
    except ValueError:
        return _convert(message)
    if _checked < CHECKED_MESSAGES:
        _checked += 1
        if messages.decode(data) != message:
            return _convert(message)
    return data


def _convert(message: tuple) -> bytes:
    global _convert_all
    _convert_all = True
    fields = [f"#{i} {type(value).__name__}" for i, value in enumerate(message) if not _plain_already(value)]
    logger.info("otel-moe: vLLM's step numbers are not all plain Python (fields %s); every message is converted, "
                "at some cost a step", ", ".join(fields))
    return messages.encode(_plain(message))


def _plain_already(value: Any) -> bool:
    try:
        return messages.decode(messages.encode(value)) == value
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

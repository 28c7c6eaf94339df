"""What handing a step's message to another thread costs a busy loop, against the loop
encoding and sending it itself (a model of vLLM's engine thread: Python interleaved with
torch calls, each of which releases the GIL). A diagnostic, not a benchmark.

    python tools/gil_handoff.py [--steps 3000] [--requests 256]

Prints the median over rounds of the loop's time a step with no message, with the message put on a queue for a
thread that encodes and sends it, and with the loop encoding and sending it. The other end
of the socket is a process of its own, as the exporter is.
"""
from __future__ import annotations

import argparse
import marshal
import os
import queue
import socket
import statistics
import threading
import time
import uuid

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--torch-calls", type=int, default=300, help="a step's torch calls")
    parser.add_argument("--rounds", type=int, default=5, help="each mode once a round, the order turning")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modes = ["none", "thread", "direct"]
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_index in range(args.rounds):
        for mode in modes[round_index % 3:] + modes[:round_index % 3]:
            times[mode].append(loop_us_per_step(mode, args))
    alone = statistics.median(times["none"])
    for mode in modes:
        median = statistics.median(times[mode])
        print(f"{mode}: {median:.1f} us a step (+{median - alone:.1f}; rounds {', '.join(f'{t:.0f}' for t in times[mode])})")


def loop_us_per_step(mode: str, args: argparse.Namespace) -> float:
    ids = [f"cmpl-{uuid.uuid4().hex}-0" for _ in range(args.requests)]
    computed = list(range(100, 100 + args.requests))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    reader = os.fork()
    if reader == 0:  # the exporter's end
        ours.close()
        while theirs.recv(1 << 21):
            pass
        os._exit(0)
    theirs.close()
    handoff: "queue.SimpleQueue" = queue.SimpleQueue()

    def publish() -> None:
        while (message := handoff.get()) is not None:
            time.sleep(0)  # where it waited for the step's CUDA event (the GIL released)
            ours.send(marshal.dumps(message))

    publisher = threading.Thread(target=publish, daemon=True)
    if mode == "thread":
        publisher.start()
    x = torch.zeros(64)
    began = time.perf_counter()
    for _ in range(args.steps):
        total = 0
        for i in range(args.torch_calls):  # the step's own work
            x.add_(1)
            total += i * i
        message = (2, 1024, [("|u1", [256, 12, 4])], 5, list(range(12)), args.requests, ids,
                   {r: 1 for r in ids}, ids, computed, [])
        if mode == "thread":
            handoff.put(message)
        elif mode == "direct":
            ours.send(marshal.dumps(message), socket.MSG_DONTWAIT)
    elapsed = time.perf_counter() - began
    if mode == "thread":
        handoff.put(None)
        publisher.join()
    ours.close()
    os.waitpid(reader, 0)
    return elapsed / args.steps * 1e6


if __name__ == "__main__":
    main()

"""Where each thread of each process spent its samples, from py-spy's raw output
(``py-spy record --format raw --threads --subprocesses``, as
``tools/bench_serve.py --py-spy`` writes it: on-CPU samples): per process and thread, the samples, the
share in otel-moe's own code (its innermost frame below every vLLM frame), and the most frequent innermost frames.

    python -m tools.py_spy_summary bench/py-spy-off.txt bench/py-spy-tokens.txt [--top 8]
"""
from __future__ import annotations

import argparse
import collections
import re

# a record: process PID:"cmd";[process PID:"cmd";...]thread (TID): NAME;frame;... COUNT
# (with --subprocesses the chain of parents comes first; the last process is the sampled one)
PROCESS = re.compile(r'process (?P<pid>\d+):"(?P<cmd>.*?)"(?=;process |$)', re.DOTALL)
THREAD = re.compile(r'^\((?P<tid>[^)]*)\)(?:: (?P<name>[^;]*))?(?P<frames>(;.*)?) (?P<count>\d+)$', re.DOTALL)


def summarize(path: str) -> dict:
    """(process, thread) -> [samples, samples in otel-moe's code, Counter of innermost frames]."""
    threads: dict = {}
    with open(path, errors="replace") as file:
        records = re.split(r'\n(?=process \d+:")', file.read().strip())  # command lines may hold newlines
    for record in records:
        chain, _, rest = record.partition(";thread ")
        processes, match = PROCESS.findall(chain), THREAD.match(rest)
        if not processes or not match:
            continue
        count = int(match["count"])
        frames = [f for f in match["frames"].split(";") if f]
        pid, cmd = processes[-1]
        process = f"{pid} {' '.join(cmd.split())[:60]}"
        entry = threads.setdefault((process, match["name"] or match["tid"]), [0, 0, collections.Counter()])
        entry[0] += count
        entry[1] += count if _in_otel_moe(frames) else 0
        entry[2][frames[-1] if frames else "(no Python frame)"] += count
    return threads


def _in_otel_moe(frames: list[str]) -> bool:
    """otel-moe's own time: below its innermost frame no vLLM frame follows (its wrapper of
    vLLM's execute_model is on the stack for the whole forward; that is vLLM's time)."""
    ours = max((i for i, f in enumerate(frames) if "otel_moe/" in f), default=-1)
    theirs = max((i for i, f in enumerate(frames) if "vllm/" in f), default=-1)
    return ours > theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    for path in args.files:
        print(f"== {path}")
        for (process, thread), (samples, ours, leaves) in sorted(summarize(path).items(), key=lambda kv: -kv[1][0]):
            print(f"  {process} / {thread}: {samples} samples, {100 * ours / samples:.1f}% in otel-moe's own code")
            for frame, count in leaves.most_common(args.top):
                print(f"      {100 * count / samples:5.1f}%  {frame}")


if __name__ == "__main__":
    main()

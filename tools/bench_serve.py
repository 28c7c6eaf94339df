"""Serving benchmark: `vllm serve` processes on one GPU, `off`, otel-moe `tokens` (OTLP to
the embedded collector) and a second `off` as noise control, measured by vLLM's own
`vllm bench serve` (random dataset, a request rate near saturation) in rounds whose
order turns.

    python -m tools.bench_serve --out bench/DATE-h200-serve-85rps.json [--rounds 3] [--servers off,tokens,off2]

Writes, per server, the median over rounds of request throughput and TTFT / TPOT
p50 / p99, each server's ratio to `off` for each, every round's numbers, and each
recording server's engine-thread time a step in every round (from its step spans). When
`off2` strays from `off` by more than 3% in request throughput or TPOT p50 the run
says it is noisy: servers in separate processes differ by themselves.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent

from otel_moe import schema  # noqa: E402
from otel_moe.collector.process import CollectorProcess  # noqa: E402
from otel_moe.report import read  # noqa: E402
from tools.bench_vllm import NOISE_TOLERANCE, engine_env, engine_thread_us_per_step, make_model  # noqa: E402

METRICS = ("request_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms")
NAMES = {"request_throughput": "request_throughput", "p50_ttft_ms": "ttft_ms_p50", "p99_ttft_ms": "ttft_ms_p99",
         "p50_tpot_ms": "tpot_ms_p50", "p99_tpot_ms": "tpot_ms_p99"}
VLLM = [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server died:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)  # no event for "the server listens": poll it
    raise RuntimeError("server did not become healthy")


def start_py_spy(pid: int, args: argparse.Namespace, mode: str) -> Optional[subprocess.Popen]:
    """py-spy on a server and its children (the engine core, otel-moe's exporter), not
    pausing them, from the start of the round's `vllm bench serve` (which takes a while to
    send its first request): on-CPU samples only, so the wait adds none. ``None`` when asked
    not to or py-spy is not there."""
    py_spy = shutil.which("py-spy") or next((str(p / "bin" / "py-spy") for p in map(Path, sys.path)
                                            if (p / "bin" / "py-spy").exists()), None)
    if not args.py_spy or py_spy is None:
        return None
    out = Path(args.out).with_name(f"py-spy-{mode}.txt")
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
                             "--threads", "--duration", str(int(args.py_spy)), "--rate", "200", "--format", "raw",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=open(f"{out}.log", "w"))


def write_results(args: argparse.Namespace, info: dict, results: dict[str, list[dict]],
                  engine_thread: Optional[dict] = None, dropped_steps: Optional[dict] = None) -> None:
    medians = {mode: {NAMES[k]: round(statistics.median(r[k] for r in rounds), 3) for k in METRICS}
               for mode, rounds in results.items()}
    ratios = {mode: {k: round(medians[mode][k] / medians["off"][k], 3) for k in medians["off"]}
              for mode in medians if mode != "off"}
    noise = None
    if "off2" in ratios:
        strays = {k: abs(ratios["off2"][k] - 1) for k in ("request_throughput", "tpot_ms_p50")}
        noise = {"off2_to_off": ratios["off2"], "tolerance": NOISE_TOLERANCE,
                 "noisy": any(v > NOISE_TOLERANCE for v in strays.values())}
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": info["name"],
           "servers": medians, "ratio_tokens_to_off": ratios.get("tokens"), "ratio_to_off": ratios, "noise": noise,
           # otel-moe's time on each recording server's engine thread a step, per counted round
           "engine_thread_us_per_step_per_round": engine_thread,
           "dropped_steps_max": dropped_steps,  # per recording server, from its step spans
           "rounds": results, "setup": {"num_prompts": args.num_prompts, "request_rate": args.request_rate,
                                        "input_len": args.input_len, "output_len": args.output_len,
                                        "dataset": "random", "tool": "vllm bench serve", "max_num_seqs": 256,
                                        "gpu_memory_utilization": args.gpu_memory_utilization}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("servers", "ratio_to_off", "noise")}, indent=1), flush=True)
    if noise and noise["noisy"]:
        print(f"NOISY RUN: two identical off servers differ by more than {NOISE_TOLERANCE:.0%}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="bench/DATE-GPU-serve-RATErps.json: named by date and hardware")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=600)
    parser.add_argument("--request-rate", type=float, default=60.0)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--servers", default="off,tokens,off2", help="off first; off2: a second off, the noise control")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.28, help="each server's share")
    parser.add_argument("--py-spy", type=float, default=0, metavar="SECONDS",
                        help="after the counted rounds, one more in which py-spy samples every server's processes "
                             "for this long, from the start of its `vllm bench serve` (cover the whole run, ~30 s; "
                             "collapsed stacks beside --out: where the engine-core threads spend their time)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="otel-moe-serve-"))
    model, info = make_model(work, "cuda", args.layers)
    collector = CollectorProcess(work / "collected")
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc")
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    modes = args.servers.split(",")
    if modes[0] != "off":
        parser.error("--servers: the first server is off (every ratio is to it)")
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    rounds_wall_ns: dict[str, list[tuple[int, int]]] = {mode: [] for mode in modes}
    try:
        for mode in results:  # one after the other: each sizes its memory with the other loaded
            port, log = free_port(), work / f"serve-{mode}.log"
            proc = subprocess.Popen(
                [*VLLM, "serve", model, "--load-format", "dummy", "--port", str(port), "--max-num-seqs", "256",
                 "--max-model-len", str(args.input_len + args.output_len + 16), "--shutdown-timeout", "10",
                 "--gpu-memory-utilization", str(args.gpu_memory_utilization)],
                env=engine_env(mode, work), stdout=open(log, "w"), stderr=subprocess.STDOUT)
            servers[mode] = (proc, port)
            wait_healthy(port, proc, log)
            print(f"server {mode} ready on {port}", flush=True)
        profiled = args.rounds + 1 if args.py_spy else None  # a last round, not counted either
        for round_index in range(args.rounds + 1 + bool(args.py_spy)):  # round 0 warms up and is not counted
            turn = round_index % len(modes)
            for mode in modes[turn:] + modes[:turn]:  # each server takes each place in the order in turn
                name = f"{mode}-{round_index}.json"
                sampler = start_py_spy(servers[mode][0].pid, args, mode) if round_index == profiled else None
                began_ns = time.time_ns()
                subprocess.run(
                    [*VLLM, "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{servers[mode][1]}",
                     "--model", model, "--dataset-name", "random", "--random-input-len", str(args.input_len),
                     "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
                     "--request-rate", str(args.request_rate), "--ignore-eos", "--seed", str(round_index),
                     "--percentile-metrics", "ttft,tpot", "--metric-percentiles", "50,99",
                     "--save-result", "--result-dir", str(work), "--result-filename", name],
                    check=True, stdout=subprocess.DEVNULL, stderr=open(work / "bench-serve.log", "a"))
                result = json.loads((work / name).read_text())
                if sampler is not None:
                    sampler.wait(timeout=args.py_spy + 60)
                if 0 < round_index <= args.rounds:
                    rounds_wall_ns[mode].append((began_ns, time.time_ns()))
                    results[mode].append({k: result[k] for k in METRICS})
                    print(mode, {NAMES[k]: round(result[k], 2) for k in METRICS}, flush=True)
                    if all(results.values()):  # a run cut short still leaves its finished rounds
                        write_results(args, info, results)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=120)
        collector.stop()
        for mode in servers:  # otel-moe's lines and the end of each server's log, beside the results
            lines = (work / f"serve-{mode}.log").read_text(errors="replace").splitlines()
            keep = [line for line in lines if "otel-moe" in line] + lines[-40:]
            Path(args.out).with_name(f"serve-{mode}.log").write_text("\n".join(keep) + "\n")
    if all(results.values()):
        spans = [s for s in read.iter_collector_spans([str(work / "collected")]) if s.name == schema.STEP_SPAN]
        recording = [mode for mode in modes if mode in ("tokens", "counts")]
        write_results(args, info, results,
                      {mode: engine_thread_us_per_step(spans, f"bench-{mode}", rounds_wall_ns[mode]) for mode in recording},
                      {mode: max((int(s.attributes.get(schema.DROPPED_STEPS, 0)) for s in spans
                                  if s.resource.get(schema.RUN_ID) == f"bench-{mode}"), default=0) for mode in recording})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: overhead of routing capture, and the throughput of the collector
and the report. Writes a JSON file and prints a table.

vLLM: one engine per mode, each in a process of its own and in vLLM's default
topology (engine core in a child process), all alive for the whole run, taking
turns (interleaved, repeated) at generating the same batch; the median throughput
of each is compared with `off` of the same run, and a second `off` engine (`off2`)
measures how far two identical engines differ (process-to-process noise).
`--device cuda` runs the same on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_engine import PREFIX  # noqa: E402
from otel_moe import synthetic  # noqa: E402
from otel_moe.collector.process import CollectorProcess  # noqa: E402

# Modes: `off` (no otel-moe), `off2` (a second `off` engine: the noise control), `paused`
# (otel-moe capturing, recording switched off by live control), `counts`, `tokens`;
# `off_eager` and `seed_style_eager` (the prototype's hook) on request.
MODES_CPU = ["off", "off2", "paused", "counts", "tokens"]
MODES_GPU = ["off", "off2", "counts", "tokens"]
NOISE_TOLERANCE = 0.03  # off2 further than this from off: the run says it is noisy


# ---- vLLM overhead ----------------------------------------------------------
def qwen15_moe_a27b_config(layers: int) -> dict:
    """Qwen1.5-MoE-A2.7B's layer shapes (random weights, loaded with load_format=dummy)."""
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
        "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": layers, "num_experts": 60,
        "num_experts_per_tok": 4, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False,
        "vocab_size": 151936, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "qkv_bias": True,
        "bos_token_id": 0, "eos_token_id": 0,
    }


def make_model(work: Path, device: str, layers: int) -> tuple[str, dict]:
    from otel_moe import tiny_model

    model = work / "model"
    if device == "cpu":
        tiny_model.build(str(model), "qwen2_moe", layers=layers)
        return str(model), {"name": f"tiny qwen2_moe, {layers} layers, 8 experts, top-2 (random weights)"}
    tiny_model.build_tokenizer(str(model))
    (model / "config.json").write_text(json.dumps(qwen15_moe_a27b_config(layers)))
    return str(model), {"name": f"Qwen1.5-MoE-A2.7B shapes, {layers} layers, 60 experts, top-4 (random weights)",
                        "load_format": "dummy"}


def engine_env(mode: str, work: Path) -> dict:
    """The environment an engine of this mode runs in: its otel-moe flags, all else as ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOG_MOE")}
    recording = mode in ("counts", "tokens", "paused")
    env.update(VLLM_LOG_MOE="otlp" if recording else "", VLLM_LOG_MOE_MODE="counts" if mode == "counts" else "tokens",
               OTEL_MOE_RUN_ID=f"bench-{mode}")
    if mode == "paused":
        control = work / "control-paused.json"
        control.write_text('{"recording": false}')
        env["VLLM_LOG_MOE_CONTROL"] = str(control)
    return env


class Engine:
    """A tools/bench_engine.py process: one engine of one mode, alive for the whole run."""

    def __init__(self, mode: str, spec: dict, work: Path) -> None:
        self.mode = mode
        spec_path = work / f"engine-{mode}.json"
        spec_path.write_text(json.dumps(spec))
        self.log = open(work / f"engine-{mode}.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "bench_engine.py"), str(spec_path)],
                                     env=engine_env(mode, work), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.start_s = self.ask(None)["start_s"]

    def ask(self, command: dict | None) -> dict:
        if command is not None:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.log.flush()
                tail = Path(self.log.name).read_text()[-3000:]
                raise RuntimeError(f"engine {self.mode} died; the end of its log:\n{tail}")
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
            self.log.write(line)  # vLLM logs to stdout: keep it with the engine's stderr

    def quit(self) -> list:
        outputs = json.loads(Path(self.ask({"quit": True})["outputs"]).read_text())
        self.proc.wait(timeout=120)
        return outputs


def _wait_until_quiet(folder: Path, limit_s: float = 60.0) -> None:
    """Until the last engine's telemetry is all written: past the exporter's idle flush
    (it holds spans that long after the last step), then until otel-moe's processes stop
    using CPU and the collector's files stop growing (a bench pause, not a test)."""
    from otel_moe.exporter.process import IDLE_FLUSH_S

    time.sleep(IDLE_FLUSH_S + 0.25)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        cpu, size = MachineWatch.telemetry_cpu_s(), _written_bytes(folder)
        time.sleep(0.25)
        after = MachineWatch.telemetry_cpu_s()
        busy = sum(t - cpu.get(pid, 0.0) for pid, t in after.items())
        if busy < 0.01 and _written_bytes(folder) == size:
            return


def _written_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.json"))


def bench_vllm(args, work: Path) -> dict:
    """Every mode's engine alive side by side, one process each (vLLM's default topology
    inside each), generating the same batch in turns; the median of each compared with
    `off` of the same run, and `off2` says how far two identical engines differ."""
    from otel_moe import read, schema
    from otel_moe.verify import exactness_problems

    modes = args.modes.split(",")
    model, model_info = make_model(work, args.device, args.layers)
    collector = CollectorProcess(work / "collected")
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc")
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the default: engine core in its own process
    engine = dict(model=model, max_model_len=args.prompt_len + args.gen_len + 16, seed=0,
                  max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization)
    if model_info.get("load_format"):
        engine["load_format"] = model_info["load_format"]
    if args.device == "cuda" and _engine_accepts("kv_cache_memory_bytes"):
        # Every engine the same KV cache, not whatever its memory profile found beside the
        # others: a smaller one runs fewer sequences at a time, a difference otel-moe did not make.
        engine["kv_cache_memory_bytes"] = kv_cache_bytes(qwen15_moe_a27b_config(args.layers), args.max_num_seqs,
                                                         engine["max_model_len"])
    prompts = [[(7 * i + 3 * j) % 500 + 1 for j in range(args.prompt_len)] for i in range(args.prompts)]
    samples: dict[str, list[float]] = {m: [] for m in modes}
    conditions: dict[str, list[dict]] = {m: [] for m in modes}  # the machine while each sample ran
    engines: dict[str, Engine] = {}
    def spec(mode: str) -> dict:
        spec = {"mode": mode, "engine": {**engine, "enforce_eager": mode.endswith("_eager")}, "prompts": prompts,
                "gen_len": args.gen_len, "outputs": str(work / f"outputs-{mode}.json")}
        if mode == "seed_style_eager":
            spec["seed_style_log"] = str(work / "seed_style.jsonl")
        return spec

    compile_s = None
    try:
        if args.device == "cuda":
            # torch.compile's first engine compiles, the others load its cache: a throwaway
            # engine compiles first, so every timed engine starts the same way.
            first = Engine("compile", spec("compile"), work)
            compile_s = first.start_s
            first.quit()
            print(f"compile cache warmed in {compile_s} s", flush=True)
        for mode in modes:  # built one after another: each sizes its memory with the others loaded
            engines[mode] = Engine(mode, spec(mode), work)
            print(f"engine {mode}: started in {engines[mode].start_s} s", flush=True)
        watch = MachineWatch(args.device == "cuda")
        for round_index in range(args.rounds + 1):  # round 0 warms up and is not counted
            for mode in _round_order(modes, round_index):
                watch.start()
                tok_s = engines[mode].ask({"run": True})["tok_s"]
                machine = watch.stop()
                _wait_until_quiet(work / "collected")  # no engine is timed beside another's backlog
                if round_index:
                    samples[mode].append(tok_s)
                    conditions[mode].append(machine)
                    print(f"{mode}: {tok_s:.0f} tok/s {machine}", flush=True)
        watch.close()
        outputs = {mode: e.quit() for mode, e in engines.items()}
        collector_peak = collector.peak_rss_kib()
    finally:
        for e in engines.values():
            if e.proc.poll() is None:
                e.proc.kill()
        collector.stop()

    throughput = {m: round(statistics.median(v), 1) for m, v in samples.items()}
    # Each round's throughput over off's in the same round, then the median: a drift of
    # the machine over the run (clocks, heat) moves both sides of a pair alike.
    paired = {m: [x / o for x, o in zip(samples[m], samples["off"])] for m in modes if m != "off"}
    ratio = {m: round(statistics.median(v), 3) for m, v in paired.items()}
    ratio_of_medians = {m: round(throughput[m] / throughput["off"], 3) for m in modes if m != "off"}
    spans = [s for s in read.iter_collector_spans([str(work / "collected")]) if s.name == schema.STEP_SPAN]
    records = [row for s in spans if s.resource.get(schema.RUN_ID) == "bench-tokens" for row in read.decode_step(s).token_rows()]
    problems = exactness_problems(records, outputs["tokens"], list(range(args.layers))) if "tokens" in modes else []
    dropped = [int(s.attributes.get(schema.DROPPED_STEPS, 0)) for s in spans]
    noisy = "off2" in ratio and abs(ratio["off2"] - 1) > NOISE_TOLERANCE
    if noisy:
        print(f"NOISY RUN: two identical off engines differ by {abs(ratio['off2'] - 1):.1%} (> {NOISE_TOLERANCE:.0%})")
    return {
        "model": model_info["name"], "device": args.device, "topology": "default",
        "schedule": "engines side by side, one process each, rounds interleaved",
        "prompts": args.prompts, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "max_num_seqs": args.max_num_seqs,
        "rounds": args.rounds, "modes": modes, "engine_start_s": {m: e.start_s for m, e in engines.items()},
        "compile_s": compile_s, "kv_cache_tokens": {m: _kv_cache_tokens(work / f"engine-{m}.log") for m in modes},
        "kv_cache_memory_bytes": engine.get("kv_cache_memory_bytes"),
        "throughput_tok_s": throughput, "samples_tok_s": {m: [round(x, 1) for x in v] for m, v in samples.items()},
        "machine_per_round": conditions, "ratio": ratio, "ratio_method": "median over rounds of the mode's throughput / off's in the same round",
        "ratio_of_medians": ratio_of_medians, "ratio_per_round": {m: [round(x, 3) for x in v] for m, v in paired.items()},
        "ratio_to_pooled_off": ratio_to_pooled_off(samples),
        "noise": {"off2_ratio": ratio.get("off2"), "tolerance": NOISE_TOLERANCE, "noisy": noisy},
        "metrics": _metrics_totals(work / "collected", outputs, args),
        "sink": "otlp (gRPC) to the embedded collector on the same machine",
        "exactness": {"records": len(records), "problems": problems[:10], "exact": not problems if "tokens" in modes else None},
        "dropped_steps_max": max(dropped, default=0), "collector_peak_rss_mib": round(collector_peak / 1024, 1),
        "paused_step_spans": sum(s.resource.get(schema.RUN_ID) == "bench-paused" for s in spans),  # must be 0
    }


def ratio_to_pooled_off(samples: dict[str, list[float]], resamples: int = 2000) -> dict:
    """Each mode's median against the median of every `off` and `off2` sample together (the
    two engines without otel-moe are one population), with a 90% bootstrap interval: how far
    the samples' own spread leaves the ratio uncertain."""
    import random

    off = samples["off"] + samples.get("off2", [])
    rng = random.Random(0)
    result = {}
    for mode, values in samples.items():
        if mode in ("off", "off2") or not values:
            continue
        boot = sorted(statistics.median(rng.choices(values, k=len(values)))
                      / statistics.median(rng.choices(off, k=len(off))) for _ in range(resamples))
        result[mode] = {"ratio": round(statistics.median(values) / statistics.median(off), 3),
                        "interval_90": [round(boot[int(0.05 * resamples)], 3), round(boot[int(0.95 * resamples)], 3)]}
    return result


# How otel-moe's processes show in /proc/PID/cmdline (an exporter renames itself once started).
TELEMETRY_PROCESSES = (b"otel_moe.cli\0collector", b"otel_moe\0exporter", b"otel-moe exporter")


class MachineWatch:
    """What the machine did while one sample ran: CPU time the hypervisor gave to others
    (steal, all CPUs), CPU time of otel-moe's own processes (exporters, collector: on a
    CPU machine taken from vLLM's cores) and, on a GPU, the mean SM clock; to tell a noisy
    sample's cause."""

    def __init__(self, gpu: bool) -> None:
        self._clocks: list[float] = []
        self._sampling = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        if gpu:
            try:
                import pynvml

                pynvml.nvmlInit()
                handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                self._clock = lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
            except Exception:  # no NVML: steal time only
                self._thread = None

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            if self._sampling.is_set():
                self._clocks.append(self._clock())

    @staticmethod
    def _steal_s() -> float:
        with open("/proc/stat") as f:
            fields = f.readline().split()  # "cpu user nice system idle iowait irq softirq steal ..."
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def telemetry_cpu_s() -> dict[int, float]:
        """CPU seconds so far of every otel-moe process (exporters and the collector)."""
        found = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    command = f.read()
                if not any(mark in command for mark in TELEMETRY_PROCESSES):
                    continue
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
                found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:  # gone meanwhile
                continue
        return found

    def start(self) -> None:
        self._steal0 = self._steal_s()
        self._telemetry0 = self.telemetry_cpu_s()
        self._clocks = []
        self._sampling.set()

    def stop(self) -> dict:
        self._sampling.clear()
        telemetry = self.telemetry_cpu_s()
        seen = {"steal_s": round(self._steal_s() - self._steal0, 2),
                "telemetry_cpu_s": round(sum(t - self._telemetry0.get(pid, 0.0) for pid, t in telemetry.items()), 2)}
        if self._clocks:
            seen["sm_mhz_mean"] = round(statistics.mean(self._clocks))
            seen["sm_mhz_min"] = min(self._clocks)
        return seen

    def close(self) -> None:
        self._stop.set()


def _round_order(modes: list[str], round_index: int) -> list[str]:
    """Each round starts one mode further along: every engine takes every place in the
    order (right after another's backlog, first after a pause) as often as the others."""
    shift = round_index % len(modes)
    return modes[shift:] + modes[:shift]


def _engine_accepts(field: str) -> bool:
    import dataclasses as dc

    from vllm.engine.arg_utils import EngineArgs

    return field in {f.name for f in dc.fields(EngineArgs)}


def kv_cache_bytes(config: dict, sequences: int, max_model_len: int) -> int:
    """Room for every sequence at full length, a quarter more for block rounding."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2  # K and V, bf16
    return int(per_token * sequences * max_model_len * 1.25)


def _kv_cache_tokens(log: Path) -> Optional[int]:
    """What the engine's log says its KV cache holds ("GPU KV cache size: 69,632 tokens")."""
    import re

    found = re.findall(r"KV cache size: ([\d,]+) tokens", log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1].replace(",", "")) if found else None


def _metrics_totals(folder: Path, outputs: dict[str, list], args) -> dict:
    """The last cumulative ``moe.expert.tokens`` of each recording engine, summed over its
    series, next to what it computed (tokens x layers x top_k): the metrics path, on by
    default with otlp, ran in the timed engines, and its totals must be exact."""
    from otel_moe import schema
    from otel_moe.verify import computed_tokens

    last: dict[tuple, int] = {}
    for file in sorted(folder.glob("metrics*.json")):
        for line in file.read_text().splitlines():
            for resource_metrics in json.loads(line).get("resourceMetrics", []):
                resource = schema.attributes(resource_metrics.get("resource", {}).get("attributes", []))
                for scope in resource_metrics.get("scopeMetrics", []):
                    for metric in scope.get("metrics", []):
                        if metric.get("name") == schema.METRIC_EXPERT_TOKENS:
                            for point in metric["sum"]["dataPoints"]:
                                series = json.dumps(point["attributes"], sort_keys=True)
                                last[resource.get(schema.RUN_ID), series] = int(point["asInt"])
    top_k = 2 if args.device == "cpu" else qwen15_moe_a27b_config(args.layers)["num_experts_per_tok"]
    result = {}
    for mode in ("counts", "tokens"):
        if mode in outputs:
            total = sum(v for (run, _), v in last.items() if run == f"bench-{mode}")
            expected = sum(computed_tokens(o) for o in outputs[mode]) * args.layers * top_k
            result[mode] = {"expert_tokens_total": total, "expected": expected, "exact": total == expected}
    return result


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- torch.profiler join ------------------------------------------------------
def bench_profile(args, work: Path) -> dict:
    """vLLM's torch profiler around one batch, compiled (CUDA graphs on a GPU) and
    eager: does the report join every profiled step, from which time source, and
    what does the trace attribute per layer? Keeps a trimmed trace of each."""
    from vllm import LLM, SamplingParams
    from vllm.config import ProfilerConfig

    from otel_moe.report.main import build_report
    from otel_moe.report.profile import load_events, profiled_steps, trace_files

    model, model_info = make_model(work, args.device, args.layers)
    prompts = [{"prompt_token_ids": [(5 * i + j) % 500 + 1 for j in range(48)]} for i in range(16)]
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0, detokenize=False)
    results = {"model": model_info["name"]}
    for tag, eager in (("compiled", False), ("eager", True)):
        routing, traces = work / f"profile-{tag}.jsonl", work / f"profile-{tag}"
        os.environ.update(engine_env("tokens", work), VLLM_LOG_MOE=str(routing), OTEL_MOE_RUN_ID=f"profile-{tag}")
        llm = LLM(model=model, enforce_eager=eager, max_model_len=128, seed=0, distributed_executor_backend="uni",
                  gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=16,
                  profiler_config=ProfilerConfig(profiler="torch", torch_profiler_dir=str(traces),
                                                 torch_profiler_with_stack=False),
                  **({"load_format": model_info["load_format"]} if model_info.get("load_format") else {}))
        llm.generate(prompts, params, use_tqdm=False)  # warm
        llm.start_profile()
        llm.generate(prompts, params, use_tqdm=False)
        llm.stop_profile()
        llm.llm_engine.engine_core.shutdown()
        del llm
        _free_device_memory()
        joined = build_report([str(routing), str(traces)], str(work / f"profile-report-{tag}"))["profile"]
        [trace] = trace_files([str(traces)])
        kept = Path(args.out).parent / f"profile-{args.device}-{tag}.trace.json.gz"
        events = load_events(trace)
        _keep_some_steps(events, kept)
        results[tag] = {k: v for k, v in joined.items() if k not in ("points", "traces")}
        results[tag]["steps"] = [[s.step, s.tokens, s.source, len(s.layer_us)] for s in profiled_steps(events)]
        results[tag]["trimmed_trace"] = str(kept)
    return results


def _keep_some_steps(events: list[dict], out: Path) -> None:
    """The first two and last two otel_moe.step ranges of a trace with what they
    launched: small enough to keep beside the results (and to test the join against)."""
    import gzip

    steps = sorted((e for e in events if e["name"].startswith("otel_moe.step ") and e.get("cat") == "user_annotation"),
                   key=lambda e: e["ts"])
    steps = steps[:2] + steps[-2:]  # a prefill and a decode or two
    inside = [e for e in events if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset")
              and any(s["ts"] <= e["ts"] <= s["ts"] + s["dur"] for s in steps)]
    correlations = {(e.get("args") or {}).get("correlation") for e in inside} - {None}
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
              and (e.get("args") or {}).get("correlation") in correlations]
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt") as f:
        json.dump({"traceEvents": inside + device}, f)


# ---- collector throughput -----------------------------------------------------
def bench_collector(args, work: Path) -> dict:
    from otel_moe.config import from_env
    from otel_moe.sinks.otlp import OtlpSink

    layers, top_k, experts, tokens, steps = 24, 4, 60, 2048, args.collector_steps
    records = list(synthetic.records(steps, tokens, layers, top_k, experts))
    collector = CollectorProcess(work / "collector-bench")
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc")
    sink = OtlpSink(from_env({"VLLM_LOG_MOE": "otlp"}), {})
    t0 = time.perf_counter()
    for record in records:
        sink.write(record)
        sink.finish(record.request_ids)
    sink.close(120)
    elapsed = time.perf_counter() - t0  # every export acknowledged: written by the collector
    peak = collector.peak_rss_kib()
    collector.stop()
    ids = steps * tokens * layers * top_k
    files = list((work / "collector-bench").glob("traces*.json"))
    return {"expert_ids_per_s": round(ids / elapsed), "expert_ids": ids, "seconds": round(elapsed, 2),
            "failed_export_spans": sink.failed_export_spans, "peak_rss_mib": round(peak / 1024, 1),
            "file_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "shape": f"{steps} steps x {tokens} tokens x {layers} layers x top-{top_k} of {experts}",
            "note": "sender (OTLP exporter) and collector share this machine's cores"}


# ---- soak: the collector under sustained load ------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_exporter_soak(args, work: Path) -> dict:
    """A worker's exporter process under steady serving load (tools/profile_sink.py's
    churning decode steps, OTLP to the embedded collector) for minutes, its memory sampled."""
    from profile_sink import ChurningSteps, synthetic_recorder

    collector = CollectorProcess(work / "exporter-soak", "--rotate-mb", "64")
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc")
    recorder = synthetic_recorder("tokens", ["otlp"])
    pid, steps = recorder.exporter.proc.pid, ChurningSteps()
    samples, count, tokens = [], 0, 0
    t0 = time.monotonic()
    next_step = next_sample = t0
    while (now := time.monotonic()) - t0 < args.exporter_soak_seconds:
        if now >= next_sample:
            samples.append((now - t0, rss_kib(pid)))
            next_sample += 1.0
        out, order = steps.step()
        index = recorder.begin_step(out)
        if index is not None:
            recorder.on_step(out, order, time.time_ns(), time.time_ns())
        count, tokens = count + 1, tokens + out.total_num_scheduled_tokens
        next_step += 1.0 / args.exporter_soak_rate
        time.sleep(max(0.0, next_step - time.monotonic()))  # a steady step rate, as an engine gives
    elapsed = time.monotonic() - t0
    recorder.close(60)
    collector.stop()
    half = [kib for t, kib in samples if t >= elapsed / 2]
    return {"seconds": round(elapsed), "steps": count, "tokens_per_s": round(tokens / elapsed),
            "expert_ids_per_s": round(tokens * 12 * 4 / elapsed), "dropped_steps": recorder.dropped_steps,
            "exporter_rss_mib_first_10s": round(max(kib for t, kib in samples if t < 10) / 1024, 1),
            "exporter_rss_mib_second_half_max": round(max(half) / 1024, 1),
            "exporter_rss_mib_samples_every_30s": [round(kib / 1024, 1) for t, kib in samples[::30]],
            "shape": "decode steps of ~250 requests + 4 new prompts of 128 tokens, 12 layers, top-4 of 60"}


def bench_soak(args, work: Path) -> dict:
    """Minutes of steady OTLP load into the collector (rotating its files), its memory sampled."""
    from otel_moe.config import from_env
    from otel_moe.sinks.otlp import OtlpSink

    layers, top_k, experts, tokens = 24, 4, 60, 2048
    records = list(synthetic.records(8, tokens, layers, top_k, experts))
    collector = CollectorProcess(work / "soak", "--rotate-mb", "64")
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc")
    sink = OtlpSink(from_env({"VLLM_LOG_MOE": "otlp"}), {})
    samples, steps, t0 = [], 0, time.monotonic()
    next_sample = t0
    while time.monotonic() - t0 < args.soak_seconds:
        record = records[steps % len(records)]
        record.step = steps
        sink.write(record)
        sink.finish(record.request_ids)
        steps += 1
        if time.monotonic() >= next_sample:
            samples.append(rss_kib(collector.proc.pid))
            next_sample += 1.0
            for old in sorted((work / "soak").glob("traces-*.json"))[:-2]:
                old.unlink()  # keep the disk bounded: rotation is what is being soaked
    sink.close(60)
    elapsed = time.monotonic() - t0
    peak = collector.peak_rss_kib()
    collector.stop()
    tail = samples[len(samples) // 2:]
    return {"seconds": round(elapsed, 1), "expert_ids_per_s": round(steps * tokens * layers * top_k / elapsed),
            "failed_export_spans": sink.failed_export_spans, "collector_rss_mib_first_10s": round(max(samples[:10]) / 1024, 1),
            "collector_rss_mib_second_half_max": round(max(tail) / 1024, 1), "collector_peak_rss_mib": round(peak / 1024, 1),
            "note": "bounded memory: the second half's maximum stays at the level of the first seconds"}


def bench_hostile_soak(args, work: Path) -> dict:
    """The soak's steady OTLP load with hostile clients beside it (tools/hostile.py: gzip and
    gRPC bombs, big requests in parallel, idle and slow connections, short bodies, garbage,
    deep JSON, bad ids), the collector at its default budget (512 MiB), its memory sampled."""
    import collections
    import threading

    from hostile import Attacks

    from otel_moe.config import from_env
    from otel_moe.sinks.otlp import OtlpSink

    layers, top_k, experts, tokens = 24, 4, 60, 2048
    records = list(synthetic.records(8, tokens, layers, top_k, experts))
    collector = CollectorProcess(work / "hostile", "--rotate-mb", "64")
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc")
    sink = OtlpSink(from_env({"VLLM_LOG_MOE": "otlp"}), {})
    attacks = Attacks(collector.host, collector.http_port, collector.grpc_port)
    answers: collections.Counter = collections.Counter()
    done = threading.Event()

    def attacker(offset: int) -> None:
        kinds = attacks.all()
        i = offset
        while not done.is_set():
            attack = kinds[i % len(kinds)]
            answers[f"{attack.__name__}: {attack()}"] += 1
            i += 1

    threads = [threading.Thread(target=attacker, args=(n,), daemon=True) for n in range(6)]
    for t in threads:
        t.start()
    samples, steps, t0 = [], 0, time.monotonic()
    next_sample = t0
    while time.monotonic() - t0 < args.soak_seconds:
        record = records[steps % len(records)]
        record.step = steps
        sink.write(record)
        sink.finish(record.request_ids)
        steps += 1
        if time.monotonic() >= next_sample:
            samples.append(rss_kib(collector.proc.pid))
            next_sample += 1.0
            for old in sorted((work / "hostile").glob("traces-*.json"))[:-2]:
                old.unlink()
    done.set()
    for t in threads:
        t.join(timeout=180)
    sink.close(60)
    elapsed = time.monotonic() - t0
    peak = collector.peak_rss_kib()
    collector.stop()
    tail = samples[len(samples) // 2:]
    return {"seconds": round(elapsed, 1), "steps_exported": steps, "failed_export_spans": sink.failed_export_spans,
            "collector_rss_mib_first_10s": round(max(samples[:10]) / 1024, 1),
            "collector_rss_mib_second_half_max": round(max(tail) / 1024, 1), "collector_peak_rss_mib": round(peak / 1024, 1),
            "memory_budget_mib": 512, "answers": dict(sorted(answers.items())),
            "traceback_lines": sum("Traceback" in line for line in collector.output)}


# ---- report throughput ----------------------------------------------------------
def bench_report(args, work: Path) -> dict:
    """Issue 12's target: a 24-layer x 60-expert top-4 log of ~1 M tokens, every figure
    included, in under 60 s and 1 GiB on the 2-core machine."""
    path = work / "report-input" / "traces.json"
    layers, top_k, experts, tokens = 24, 4, 60, 2048
    synthetic.write_collector_file(path, synthetic.records(args.report_steps, tokens, layers, top_k, experts))
    ids = args.report_steps * tokens * layers * top_k
    # In a fresh process, for its own peak memory (VmHWM: ru_maxrss would carry the forking
    # parent's peak across exec); the streaming pass is timed apart from the PNGs.
    code = ("import json, sys, time\nimport otel_moe.report.build as build\n"
            "from otel_moe.report.main import build_report\ntimes = {}\nplain = build.aggregate\n"
            "def timed(*a, **k):\n    t = time.perf_counter()\n    r = plain(*a, **k)\n"
            "    times['aggregate'] = time.perf_counter() - t\n    return r\n"
            "build.aggregate = timed\nt = time.perf_counter()\nbuild_report([sys.argv[1]], sys.argv[2])\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'aggregate_seconds': times['aggregate'], "
            "'peak_rss_kib': [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]}))")
    result = json.loads(subprocess.run([sys.executable, "-c", code, str(path), str(work / "report-out")],
                                       check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return {"expert_ids_per_s": round(ids / result["aggregate_seconds"]), "expert_ids": ids,
            "tokens": args.report_steps * tokens, "shape": f"{layers} layers x top-{top_k} of {experts}",
            "aggregate_seconds": round(result["aggregate_seconds"], 2),
            "whole_report_seconds": round(result["seconds"], 2), "seconds": round(result["seconds"], 2),
            "whole_report_expert_ids_per_s": round(ids / result["seconds"]),
            "input_mib": round(path.stat().st_size / 2**20, 1), "peak_rss_mib": round(result["peak_rss_kib"] / 1024, 1),
            "note": "expert_ids_per_s: the streaming pass over the input; the figures come on top"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sections", default="vllm,profile,collector,report,soak,hostile_soak,exporter_soak")
    parser.add_argument("--exporter-soak-seconds", type=float, default=120)
    parser.add_argument("--exporter-soak-rate", type=float, default=50, help="steps per second")
    parser.add_argument("--soak-seconds", type=float, default=120)
    parser.add_argument("--modes", default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--gen-len", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--collector-steps", type=int, default=60)
    parser.add_argument("--report-steps", type=int, default=512, help="x 2048 tokens")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.modes = args.modes or ",".join(MODES_GPU if gpu else MODES_CPU)
    engines = len(args.modes.split(","))
    # GPU: Qwen1.5-MoE-A2.7B shapes, 12 layers (~15 GB of weights an engine) where every
    # engine fits (an H200), else 6; a KV cache for every running sequence (no preemption:
    # a preempted request is computed, and recorded, twice).
    big_gpu = gpu and _gpu_memory_gib() > 100
    args.layers = args.layers or (12 if big_gpu else 6 if gpu else 8)
    args.prompts = args.prompts or (1024 if gpu else 64)
    args.prompt_len = args.prompt_len or (128 if gpu else 64)
    args.gen_len = args.gen_len or (128 if gpu else 64)
    args.max_num_seqs = args.max_num_seqs or (256 if gpu else args.prompts)
    args.gpu_memory_utilization = args.gpu_memory_utilization or (round(0.9 / engines, 3) if gpu else 0.05)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    work = Path(tempfile.mkdtemp(prefix="otel-moe-bench-"))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(gpu)}
    sections = args.sections.split(",")
    try:
        if "vllm" in sections:
            results["vllm_gpu" if gpu else "vllm_cpu"] = bench_vllm(args, work)
        if "profile" in sections:
            results["profile_gpu" if gpu else "profile_cpu"] = bench_profile(args, work)
        if "collector" in sections:
            results["collector"] = bench_collector(args, work)
        if "report" in sections:
            results["report"] = bench_report(args, work)
        if "soak" in sections:
            results["soak"] = bench_soak(args, work)
        if "hostile_soak" in sections:
            results["hostile_soak"] = bench_hostile_soak(args, work)
        if "exporter_soak" in sections:
            results["exporter_soak"] = bench_exporter_soak(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"\nwritten: {out}")
    return 0


def _gpu_memory_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0


def machine_info(gpu: bool) -> dict:
    import torch

    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:
        pass
    if gpu and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(results: dict) -> None:
    for key in ("vllm_cpu", "vllm_gpu"):
        if key in results:
            r = results[key]
            print(f"\n{key}: {r['model']}, {r['prompts']} prompts x {r['gen_len']} tokens, median of {r['rounds']} rounds")
            print(f"{'mode':<22}{'tok/s':>10}{'ratio':>8}")
            for mode, tps in r["throughput_tok_s"].items():
                print(f"{mode:<22}{tps:>10.0f}{r['ratio'].get(mode, 1.0):>8.3f}")
            print(f"exact: {r['exactness']['exact']} ({r['exactness']['records']} records); dropped steps: {r['dropped_steps_max']}; "
                  f"step spans while paused: {r['paused_step_spans']}; noise (off2/off): {r['noise']['off2_ratio']}"
                  f"{' NOISY' if r['noise']['noisy'] else ''}")
    for key in ("profile_cpu", "profile_gpu"):
        for tag, r in results.get(key, {}).items():
            if isinstance(r, dict):
                print(f"{key} {tag}: {r['steps_joined']} of {r['steps_in_trace']} profiled steps joined "
                      f"({', '.join(r['time_source'])}); per-layer MoE us: "
                      + ", ".join(f"{layer}: {v['moe_us_mean']:.0f}" for layer, v in r["layers"].items()))
    if "exporter_soak" in results:
        r = results["exporter_soak"]
        print(f"exporter soak: {r['seconds']} s, {r['steps']} steps at {r['expert_ids_per_s'] / 1e6:.1f}M ids/s, "
              f"{r['dropped_steps']} dropped, exporter RSS {r['exporter_rss_mib_first_10s']} MiB early, "
              f"{r['exporter_rss_mib_second_half_max']} MiB late")
    if "soak" in results:
        r = results["soak"]
        print(f"soak: {r['seconds']} s at {r['expert_ids_per_s'] / 1e6:.1f}M ids/s, collector RSS "
              f"{r['collector_rss_mib_first_10s']} MiB early, {r['collector_rss_mib_second_half_max']} MiB late")
    if "hostile_soak" in results:
        r = results["hostile_soak"]
        print(f"hostile soak: {r['seconds']} s, collector RSS {r['collector_rss_mib_first_10s']} MiB early, "
              f"{r['collector_rss_mib_second_half_max']} MiB late, peak {r['collector_peak_rss_mib']} MiB "
              f"(budget {r['memory_budget_mib']}); failed spans {r['failed_export_spans']}; {r['answers']}")
    for key in ("collector", "report"):
        if key in results:
            r = results[key]
            print(f"{key}: {r['expert_ids_per_s'] / 1e6:.1f}M expert ids/s, peak {r['peak_rss_mib']} MiB ({r['seconds']} s)")


if __name__ == "__main__":
    sys.exit(main())

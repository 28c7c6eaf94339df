"""`make bench`: overhead of routing capture, and the throughput of the collector
and the report. Writes a JSON file and prints a table.

The vLLM part (tools/bench_vllm.py): every mode an engine of its own process,
side by side, taking turns, with a second `off` engine as noise control.
`--device cuda` runs the same on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from otel_moe.collector.process import CollectorProcess  # noqa: E402
from tools import synthetic  # noqa: E402
from tools.bench_vllm import MODES_CPU, MODES_GPU, bench_vllm, engine_env, engine_of, make_model  # noqa: E402


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

    model, model_info = make_model(work, args.device, args.layers, args.shape)
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
        kept = Path(args.out).with_name(f"{Path(args.out).stem}-profile-{tag}.trace.json.gz")
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
    from otel_moe.exporter.sinks.otlp import OtlpSink

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
    from otel_moe.worker import binding
    from tools.profile_sink import ChurningSteps, synthetic_recorder

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
        scheduled = binding.scheduled_step(out)
        index = recorder.begin_step(scheduled)
        if index is not None:
            recorder.on_step(scheduled, None if recorder.counts_only else order, time.time_ns(), time.time_ns())
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
    from otel_moe.exporter.sinks.otlp import OtlpSink

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

    from otel_moe.config import from_env
    from otel_moe.exporter.sinks.otlp import OtlpSink
    from tools.hostile import Attacks

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
            "import resource\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'aggregate_seconds': times['aggregate'], "
            "'peak_rss_kib': [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0], "
            "'reader_peak_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    result = json.loads(subprocess.run([sys.executable, "-c", code, str(path), str(work / "report-out")],
                                       check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return {"expert_ids_per_s": round(ids / result["aggregate_seconds"]), "expert_ids": ids,
            "tokens": args.report_steps * tokens, "shape": f"{layers} layers x top-{top_k} of {experts}",
            "aggregate_seconds": round(result["aggregate_seconds"], 2),
            "whole_report_seconds": round(result["seconds"], 2), "seconds": round(result["seconds"], 2),
            "whole_report_expert_ids_per_s": round(ids / result["seconds"]),
            "input_mib": round(path.stat().st_size / 2**20, 1), "peak_rss_mib": round(result["peak_rss_kib"] / 1024, 1),
            "reader_peak_rss_mib": round(result["reader_peak_rss_kib"] / 1024, 1),
            "note": "expert_ids_per_s: the streaming pass over the input (its reading in a second process, "
                    "reader_process); the figures come on top"}


def default_out(gpu: bool) -> str:
    """Results are named by date and hardware: bench/2026-12-06-cpu-2core.json, bench/2026-12-06-gpu-h200.json."""
    date = time.strftime("%Y-%m-%d", time.gmtime())
    if not gpu:
        return f"bench/{date}-cpu-{os.cpu_count()}core.json"
    import torch

    name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip().split()[0]
    return f"bench/{date}-gpu-{name}.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="default: bench/DATE-cpu-NCORE.json (or -gpu-NAME on --device cuda)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sections", default="vllm,profile,collector,report,soak,hostile_soak,exporter_soak")
    parser.add_argument("--exporter-soak-seconds", type=float, default=120)
    parser.add_argument("--exporter-soak-rate", type=float, default=50, help="steps per second")
    parser.add_argument("--soak-seconds", type=float, default=120)
    parser.add_argument("--modes", default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--shape", choices=["qwen1.5-moe", "deepseek-v3"], default="qwen1.5-moe",
                        help="the model of a GPU run (random weights; see tools/bench_vllm.py's GPU_SHAPES)")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--gen-len", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--keep-awake", choices=["no", "yes", "alternate"], default="no",
                        help="spin every CPU at SCHED_IDLE priority during rounds (alternate: every other round)")
    parser.add_argument("--profile-prompts", type=int, default=None,
                        help="after the rounds, one turn of this many prompts per engine under the torch profiler "
                             "(0: none; default 256 on a GPU, 0 on CPU)")
    parser.add_argument("--profile-gen-len", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--collector-steps", type=int, default=60)
    parser.add_argument("--report-steps", type=int, default=512, help="x 2048 tokens")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.out = args.out or default_out(gpu)
    args.modes = args.modes or ",".join(MODES_GPU if gpu else MODES_CPU)
    engines = len({engine_of(m) for m in args.modes.split(",")})  # processes: two switched modes share one
    # GPU: Qwen1.5-MoE-A2.7B shapes, 12 layers (~15 GB of weights an engine) where every
    # engine fits (an H200), else 6; a KV cache for every running sequence (no preemption:
    # a preempted request is computed, and recorded, twice).
    big_gpu = gpu and _gpu_memory_gib() > 100
    args.layers = args.layers or (12 if big_gpu else 6 if gpu else 8)
    args.profile_prompts = (256 if gpu else 0) if args.profile_prompts is None else args.profile_prompts
    args.prompts = args.prompts or (1024 if gpu else 256)  # CPU: 256 at once, vLLM's default max_num_seqs
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
            parts = [("all rounds", r)] + [(f"{name} rounds", part) for name, part in (r.get("by_keep_awake") or {}).items()]
            for title, part in parts:
                print(f"{title}: {'mode':<14}{'tok/s':>10}{'ratio':>8}{'spread':>8}")
                for mode, tps in part["throughput_tok_s"].items():
                    print(f"{'':<12}{mode:<14}{tps:>10.0f}{part['ratio'].get(mode, 1.0):>8.3f}{part['spread'][mode]:>8.3f}")
            print(f"exact: {r['exactness']['exact']} ({r['exactness']['records']} records); dropped steps: {r['dropped_steps_max']}; "
                  f"step spans while paused: {r['paused_step_spans']}; noise (off2/off): {r['noise']['off2_ratio']}"
                  f"{' NOISY' if r['noise']['noisy'] else ''}")
            print(f"engine thread per recorded step (us): {r.get('engine_thread_us_per_step')}")
            if r.get("within_process"):
                w = r["within_process"]
                print(f"within one process (switched, recording / paused): {w['ratio']} {w['interval_90']} by round "
                      f"{w['ratio_per_round']}; "
                      f"exact: {r['switched_exactness']['exact']} ({r['switched_exactness']['records']} records)")
            print(f"the model's process a turn (median): {r.get('engine_process_per_turn')}")
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
            reader = f" + reader {r['reader_peak_rss_mib']} MiB" if "reader_peak_rss_mib" in r else ""
            print(f"{key}: {r['expert_ids_per_s'] / 1e6:.1f}M expert ids/s, peak {r['peak_rss_mib']} MiB{reader} ({r['seconds']} s)")


if __name__ == "__main__":
    sys.exit(main())

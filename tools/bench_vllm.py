"""The vLLM part of `make bench`: one engine per mode, each in a process of its own
(tools/bench_engine.py) and in vLLM's default topology (engine core in a child
process), all alive for the whole run, taking turns at generating the same batch;
each mode's throughput compared with `off` of the same run, turn by turn, and a
second `off` engine (`off2`) says how far two identical engines differ.
`--device cuda` runs the same on a GPU. See BENCHMARKS.md for how to read it.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from otel_moe.collector.process import CollectorProcess
from tools.bench_engine import PREFIX

ROOT = Path(__file__).resolve().parent.parent

# Modes: `off` (no otel-moe), `off2` (a second `off` engine: the noise control), `paused`
# (otel-moe capturing, recording switched off by live control), `counts`, `tokens`;
# `off_eager` and `seed_style_eager` (the prototype's hook) on request.
MODES_CPU = ["off", "off2", "paused", "counts", "tokens"]
MODES_GPU = ["off", "off2", "counts", "tokens", "switched_tokens", "switched_paused"]  # five engine processes
NOISE_TOLERANCE = 0.03  # off2 further than this from off: the run says it is noisy
# `switched_tokens` and `switched_paused` (on a GPU by default): two modes served by one
# engine process (`switched`: tokens mode, live control on) whose control file the bench
# rewrites before each of its turns: recording and paused compared inside one process,
# free of the noise between processes (up to 17% on a GPU host), which more rounds never
# average out.
SWITCHED = {"switched_tokens": {"recording": True}, "switched_paused": {"recording": False}}
SWITCHED_ENGINE = "switched"


def engine_of(mode: str) -> str:
    """The engine process that serves a mode."""
    return SWITCHED_ENGINE if mode in SWITCHED else mode


def run_id(mode: str) -> str:
    """The otel_moe.run_id its spans carry."""
    return f"bench-{engine_of(mode)}"


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


def deepseek_v3_routing_config(layers: int) -> dict:
    """DeepSeek-V3's routing shape (256 routed experts, top-8; 58 MoE layers in the real
    model) on Qwen3-MoE's architecture, narrow (hidden 512, experts of 256) so that three
    engines of 58 layers fit one H100: ~12 GB of random weights each. Narrow layers make
    short steps, which leaves otel-moe's fixed cost per step the least room."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 512,
        "intermediate_size": 1024, "moe_intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 64, "num_hidden_layers": layers, "num_experts": 256, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "vocab_size": 151936,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": False,
        "bos_token_id": 0, "eos_token_id": 0,
    }


GPU_SHAPES = {  # --shape: the model a GPU bench runs
    "qwen1.5-moe": (qwen15_moe_a27b_config, "Qwen1.5-MoE-A2.7B shapes, {layers} layers, 60 experts, top-4"),
    "deepseek-v3": (deepseek_v3_routing_config, "DeepSeek-V3's routing, {layers} layers, 256 experts, top-8, hidden 512"),
}


def gpu_config(shape: str, layers: int) -> dict:
    return GPU_SHAPES[shape][0](layers)


def make_model(work: Path, device: str, layers: int, shape: str = "qwen1.5-moe") -> tuple[str, dict]:
    from otel_moe import tiny_model

    model = work / "model"
    if device == "cpu":
        tiny_model.build(str(model), "qwen2_moe", layers=layers)
        return str(model), {"name": f"tiny qwen2_moe, {layers} layers, 8 experts, top-2 (random weights)"}
    tiny_model.build_tokenizer(str(model))
    (model / "config.json").write_text(json.dumps(gpu_config(shape, layers)))
    return str(model), {"name": GPU_SHAPES[shape][1].format(layers=layers) + " (random weights)", "load_format": "dummy"}


def engine_env(mode: str, work: Path) -> dict:
    """The environment an engine of this mode runs in: its otel-moe flags, all else as ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOG_MOE")}
    recording = mode in ("counts", "tokens", "paused", "tokens_discard", SWITCHED_ENGINE)
    # tokens_discard (on request): tokens mode, every step read by the exporter and no record
    # made or sent: otel-moe's cost in vLLM's process, apart from its sinks' and collector's CPU.
    env.update(VLLM_LOG_MOE=("discard" if mode == "tokens_discard" else "otlp") if recording else "",
               VLLM_LOG_MOE_MODE="counts" if mode == "counts" else "tokens",
               OTEL_MOE_RUN_ID=f"bench-{mode}",
               # tools/engine_probe.py's functions reach the workers over collective_rpc (every
               # engine alike; vLLM's own messages are encoded as before)
               VLLM_ALLOW_INSECURE_SERIALIZATION="1",
               # ... by reference to tools.engine_probe: vLLM's processes import it from the checkout
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if mode in ("paused", SWITCHED_ENGINE):
        control = work / f"control-{mode}.json"
        control.write_text('{"recording": false}')
        env["VLLM_LOG_MOE_CONTROL"] = str(control)
    return env


def switch(work: Path, mode: str) -> None:
    """Before a turn of a switched mode: its engine's control file asks for it (applied
    at the turn's first step; the previous turn's requests have all finished)."""
    from otel_moe.config import parse_layers
    from otel_moe.control import ControlFile, ControlState

    ControlFile(str(work / f"control-{SWITCHED_ENGINE}.json")).update(
        SWITCHED[mode], ControlState(True, parse_layers(""), "tokens"))


class Engine:
    """A tools/bench_engine.py process: one engine of one mode, alive for the whole run."""

    def __init__(self, mode: str, spec: dict, work: Path) -> None:
        self.mode = mode
        spec_path = work / f"engine-{mode}.json"
        spec_path.write_text(json.dumps(spec))
        self.log = open(work / f"engine-{mode}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.bench_engine", str(spec_path)], cwd=ROOT,
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
        self.log.close()  # its last lines (the engine's shutdown) are read after the run
        return outputs


def _wait_until_quiet(folder: Path, limit_s: float = 60.0) -> None:
    """Until the last engine's telemetry is all written: past the exporter's idle flush
    (it holds spans that long after the last step), then until otel-moe's processes stop
    using CPU and the collector's files stop growing (a bench pause, not a test)."""
    from otel_moe.exporter.receiver import IDLE_FLUSH_S

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
    inside each), generating the same batch in turns; each compared with `off` turn by
    turn, and `off2` says how far two identical engines differ."""
    from otel_moe import schema

    modes = args.modes.split(",")
    processes = list(dict.fromkeys(engine_of(m) for m in modes))  # engine processes, in the modes' order
    model, model_info = make_model(work, args.device, args.layers, args.shape)
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
        engine["kv_cache_memory_bytes"] = kv_cache_bytes(gpu_config(args.shape, args.layers), args.max_num_seqs,
                                                         engine["max_model_len"])
    prompts = [[(7 * i + 3 * j) % 500 + 1 for j in range(args.prompt_len)] for i in range(args.prompts)]
    samples: dict[str, list[float]] = {m: [] for m in modes}
    conditions: dict[str, list[dict]] = {m: [] for m in modes}  # the machine while each sample ran
    engines: dict[str, Engine] = {}
    awake_rounds: list[bool] = []  # per counted round: were the CPUs kept awake (--keep-awake)
    turns: dict[str, list[tuple[int, int]]] = {m: [] for m in modes}  # wall clock of each counted turn
    probes: dict[str, list[dict]] = {m: [] for m in modes}  # what the model's process spent in each (engine_probe.py)
    switched_turns: list[tuple[str, int]] = []  # the switched engine's turns in order: (mode, prompts)

    def spec(mode: str) -> dict:
        spec = {"mode": mode, "engine": {**engine, "enforce_eager": mode.endswith("_eager")}, "prompts": prompts,
                "gen_len": args.gen_len, "outputs": str(work / f"outputs-{mode}.json")}
        if mode == "seed_style_eager":
            spec["seed_style_log"] = str(work / "seed_style.jsonl")
        return spec

    compile_s = None
    profiles = None
    try:
        if args.device == "cuda":
            # torch.compile's first engine compiles, the others load its cache: a throwaway
            # engine compiles first, so every timed engine starts the same way.
            first = Engine("compile", spec("compile"), work)
            compile_s = first.start_s
            first.quit()
            print(f"compile cache warmed in {compile_s} s", flush=True)
        for name in processes:  # built one after another: each sizes its memory with the others loaded
            engines[name] = Engine(name, spec(name), work)
            print(f"engine {name}: started in {engines[name].start_s} s", flush=True)
        watch = MachineWatch(args.device == "cuda")
        for round_index in range(args.rounds + 1):  # round 0 warms up and is not counted
            awake = _keeps_awake(args.keep_awake, round_index)
            if round_index:
                awake_rounds.append(awake)
            with KeepAwake(awake):
                for mode in _round_order(modes, round_index):
                    if mode in SWITCHED:
                        switch(work, mode)
                        switched_turns.append((mode, args.prompts))
                    watch.start()
                    began_ns = time.time_ns()
                    reply = engines[engine_of(mode)].ask({"run": True})
                    tok_s = reply["tok_s"]
                    ended_ns = time.time_ns()
                    machine = watch.stop()
                    _wait_until_quiet(work / "collected")  # no engine is timed beside another's backlog
                    if round_index:
                        samples[mode].append(tok_s)
                        turns[mode].append((began_ns, ended_ns))
                        probes[mode].append(reply["probe"])
                        conditions[mode].append({**machine, "keep_awake": awake})
                        print(f"{mode}: {tok_s:.0f} tok/s {machine} {reply['probe']}{' (kept awake)' if awake else ''}",
                              flush=True)  # as it goes: a run cut short still tells something
        watch.close()
        # The turns alone, before the long part (every span read back, every token checked): a
        # run cut short there (a lent GPU's time running out) still leaves them.
        turns_file = Path(args.out).with_suffix(".turns.json")
        turns_file.parent.mkdir(parents=True, exist_ok=True)
        early = {**summarize(samples), "engine_process_per_turn": {m: _median_probe(v) for m, v in probes.items()},
                 "engine_process_per_round": probes, "samples_tok_s": samples}
        turns_file.write_text(json.dumps(early, indent=1))
        if args.profile_prompts:
            # After the timed rounds (the profiler slows what it watches): one short turn each.
            turn = {"prompts": args.profile_prompts, "gen_len": args.profile_gen_len}
            if SWITCHED_ENGINE in engines:  # profiled recording, as tokens
                switch(work, "switched_tokens")
                switched_turns.append(("switched_tokens", args.profile_prompts))
            profiles = {name: e.ask({"profile": turn})["profile"] for name, e in engines.items()}
            profiles["turn"] = turn
            turns_file.write_text(json.dumps({**early, "profile": profiles}, indent=1))
            print(f"profiled: {json.dumps(profiles)}", flush=True)
        outputs = {mode: e.quit() for mode, e in engines.items()}
        collector_peak = collector.peak_rss_kib()
    finally:
        for e in engines.values():
            if e.proc.poll() is None:
                e.proc.kill()
        collector.stop()

    spans, coverage = step_spans(work / "collected", ("tokens", SWITCHED_ENGINE))
    problems = coverage["tokens"].problems(outputs["tokens"], list(range(args.layers))) if "tokens" in modes else []
    switched = switched_exactness(coverage[SWITCHED_ENGINE], outputs.get(SWITCHED_ENGINE), switched_turns, args.layers)
    dropped = [int(s.attributes.get(schema.DROPPED_STEPS, 0)) for s in spans]
    summary = summarize(samples)
    if summary["noise"]["noisy"]:
        print(f"NOISY RUN: two identical off engines differ by {abs(summary['ratio']['off2'] - 1):.1%} "
              f"(> {NOISE_TOLERANCE:.0%})")
    by_keep_awake = None
    if args.keep_awake == "alternate":  # the same engines, every other round with the CPUs kept awake
        by_keep_awake = {name: summarize({m: [x for x, a in zip(v, awake_rounds) if a == awake] for m, v in samples.items()})
                         for name, awake in (("awake", True), ("plain", False))}
    return {
        "model": model_info["name"], "device": args.device, "topology": "default",
        "schedule": "engines side by side, one process each, rounds interleaved",
        "prompts": args.prompts, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "max_num_seqs": args.max_num_seqs,
        "rounds": args.rounds, "modes": modes, "engine_start_s": {m: e.start_s for m, e in engines.items()},
        "within_process": within_process(samples) if set(SWITCHED) <= set(modes) else None,
        "compile_s": compile_s, "kv_cache_tokens": {m: _kv_cache_tokens(work / f"engine-{m}.log") for m in processes},
        "kv_cache_memory_bytes": engine.get("kv_cache_memory_bytes"),
        "engine_thread_us_per_step": {m: engine_thread_us_per_step(spans, run_id(m), [(0, time.time_ns())])[0]
                                      for m in modes if m in ("counts", "tokens", "switched_tokens")},
        "engine_thread_us_per_step_per_round": {m: engine_thread_us_per_step(spans, run_id(m), turns[m])
                                                for m in modes if m in ("counts", "tokens", "switched_tokens")},
        "engine_process_per_turn": {m: _median_probe(v) for m, v in probes.items()},
        "engine_process_per_round": probes,
        "samples_tok_s": {m: [round(x, 1) for x in v] for m, v in samples.items()},
        "machine_per_round": conditions, **summary,
        "ratio_method": "median over rounds of the mode's throughput / off's in the same round",
        "keep_awake": args.keep_awake, "by_keep_awake": by_keep_awake,
        "metrics": _metrics_totals(work / "collected", outputs, args.layers,
                                   json.loads((Path(model) / "config.json").read_text())["num_experts_per_tok"]),
        "sink": "otlp (gRPC) to the embedded collector on the same machine",
        "exactness": {"records": coverage["tokens"].records, "problems": problems[:10],
                      "exact": not problems if "tokens" in modes else None},
        "switched_exactness": switched,
        "dropped_steps_max": max(dropped, default=0), "collector_peak_rss_mib": round(collector_peak / 1024, 1),
        "profile": profiles,
        "paused_step_spans": sum(s.resource.get(schema.RUN_ID) == "bench-paused" for s in spans)  # must be 0
        + sum(began <= s.start_ns <= ended for s in spans if s.resource.get(schema.RUN_ID) == run_id(SWITCHED_ENGINE)
              for began, ended in turns.get("switched_paused", [])),
    }


def step_spans(folder: Path, checked: tuple[str, ...]) -> tuple[list, dict]:
    """One streaming pass over the collected spans: each ``moe.step`` span kept with only
    the attributes the timing figures read, and the spans of each engine in ``checked``
    fed to its exactness check (a GPU run's ~100 M records never held at once)."""
    from otel_moe import schema
    from otel_moe.report import read
    from tools.verify import StepCoverage

    kept_attributes = (schema.STEP_INDEX, schema.STEP_LAST_INDEX, schema.ENGINE_THREAD_NS, schema.DROPPED_STEPS)
    coverage = {mode: StepCoverage() for mode in checked}
    checked_runs = {run_id(mode): coverage[mode] for mode in checked}
    spans = []
    for span in read.iter_collector_spans([str(folder)]):
        if span.name != schema.STEP_SPAN:
            continue
        check = checked_runs.get(span.resource.get(schema.RUN_ID))
        if check is not None:
            check.add(read.decode_step(span))
        spans.append(read.Span(span.name, {schema.RUN_ID: span.resource.get(schema.RUN_ID)},
                               {k: span.attributes[k] for k in kept_attributes if k in span.attributes},
                               span.start_ns, span.end_ns, []))
    return spans, coverage


def switched_exactness(coverage, outputs: Optional[list], switched_turns: list[tuple[str, int]],
                       layers: int) -> Optional[dict]:
    """The switched engine's records against the outputs of its recording turns alone (its
    outputs come turn by turn, in order): its paused turns must have recorded nothing."""
    if outputs is None:
        return None
    recorded, at = [], 0
    for mode, prompts in switched_turns:
        if SWITCHED[mode]["recording"]:
            recorded.extend(outputs[at: at + prompts])
        at += prompts
    problems = coverage.problems(recorded, list(range(layers)))
    return {"records": coverage.records, "problems": problems[:10], "exact": not problems}


def within_process(samples: dict[str, list[float]]) -> dict:
    """The switched engine's recording turns over its paused turns of the same round: what
    recording costs, with the process (and its luck) the same on both sides."""
    per_round = [on / off for on, off in zip(samples["switched_tokens"], samples["switched_paused"])]
    return {"ratio": round(statistics.median(per_round), 3), "interval_90": median_interval(per_round),
            "ratio_per_round": [round(r, 3) for r in per_round],
            "method": "median over rounds of the switched engine's recording turn over its paused turn"}


def median_interval(values: list[float], resamples: int = 4000) -> list[float]:
    """A 90% bootstrap interval of the median of ``values``."""
    import random

    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [round(boot[int(0.05 * resamples)], 3), round(boot[int(0.95 * resamples)], 3)]


def _median_probe(probes: list[dict]) -> dict:
    return {k: round(statistics.median(p[k] for p in probes), 4) for k in probes[0]} if probes else {}


def summarize(samples: dict[str, list[float]]) -> dict:
    """Throughputs and ratios to `off` of some rounds' samples (every mode, the same rounds)."""
    modes = [m for m, v in samples.items() if v]
    throughput = {m: round(statistics.median(samples[m]), 1) for m in modes}
    # Each round's throughput over off's in the same round, then the median: a drift of
    # the machine over the run (clocks, heat) moves both sides of a pair alike.
    paired = {m: [x / o for x, o in zip(samples[m], samples["off"])] for m in modes if m != "off"}
    ratio = {m: round(statistics.median(v), 3) for m, v in paired.items()}
    noisy = "off2" in ratio and abs(ratio["off2"] - 1) > NOISE_TOLERANCE
    return {"rounds_counted": len(samples["off"]), "throughput_tok_s": throughput, "ratio": ratio,
            "ratio_of_medians": {m: round(throughput[m] / throughput["off"], 3) for m in modes if m != "off"},
            "ratio_per_round": {m: [round(x, 3) for x in v] for m, v in paired.items()},
            "spread": {m: round(statistics.pstdev(samples[m]) / statistics.mean(samples[m]), 3) for m in modes},
            "ratio_to_pooled_off": ratio_to_pooled_off({m: samples[m] for m in modes}),
            "noise": {"off2_ratio": ratio.get("off2"), "tolerance": NOISE_TOLERANCE, "noisy": noisy}}


def _keeps_awake(choice: str, round_index: int) -> bool:
    return choice == "yes" or (choice == "alternate" and round_index % 2 == 0)


class KeepAwake:
    """While it is open, one spinning process per CPU at the lowest priority there is
    (SCHED_IDLE): any thread that wakes up preempts one at once, and finds its virtual CPU
    running instead of halted, so no wake-up waits on the hypervisor to resume a halted
    vCPU. A guest's stand-in for booting with idle=poll, which benchmark hosts use for the
    same reason; every engine of a round runs under it alike."""

    SPIN = ("import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\n"
            "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True:\n    pass\n")

    def __init__(self, on: bool) -> None:
        self.on = on
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "KeepAwake":
        if self.on:
            self.procs = [subprocess.Popen([sys.executable, "-c", self.SPIN, str(cpu)], stdin=subprocess.DEVNULL)
                          for cpu in sorted(os.sched_getaffinity(0))]
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


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


def process_cpu_s(pid: int) -> float:
    """CPU seconds so far of a process (user and system, all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
                found[int(entry.name)] = process_cpu_s(int(entry.name))
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
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2  # K and V, bf16
    return int(per_token * sequences * max_model_len * 1.25)


def _kv_cache_tokens(log: Path) -> Optional[int]:
    """What the engine's log says its KV cache holds ("GPU KV cache size: 69,632 tokens")."""
    import re

    found = re.findall(r"KV cache size: ([\d,]+) tokens", log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1].replace(",", "")) if found else None


def engine_thread_us_per_step(spans: list, run_id: str, turns: list[tuple[int, int]]) -> list[Optional[float]]:
    """Recording's time on vLLM's engine thread per step, in each stretch of wall clock
    (a turn, or the whole run), from the step spans that began in it: the growth of their
    cumulative ``otel_moe.engine_thread_ns`` over the steps they cover."""
    from otel_moe import schema

    points = sorted((s.start_ns, s.attributes.get(schema.STEP_LAST_INDEX, s.attributes[schema.STEP_INDEX]),
                     s.attributes.get(schema.ENGINE_THREAD_NS, 0)) for s in spans if s.resource.get(schema.RUN_ID) == run_id)
    result = []
    for began, ended in turns:
        inside = [(step, ns) for start, step, ns in points if began <= start <= ended]
        (first_step, first_ns), (last_step, last_ns) = min(inside, default=(0, 0)), max(inside, default=(0, 0))
        result.append(round((last_ns - first_ns) / (last_step - first_step) / 1000, 1) if last_step > first_step else None)
    return result


def _metrics_totals(folder: Path, outputs: dict[str, list], layers: int, top_k: int) -> dict:
    """Each recording engine's ``moe.expert.tokens``, summed over the collector's metrics
    files by the report's own reader, next to what it computed (tokens x layers x top_k):
    the metrics path, on by default with otlp, ran in the timed engines and must be exact."""
    from otel_moe.report.inputs import MetricsDeltas
    from otel_moe.report.read import LineStats
    from tools.verify import computed_tokens

    deltas, totals = MetricsDeltas(LineStats()), {}
    for file in sorted(folder.glob("metrics*.json")):
        for line in file.read_text().splitlines():
            for window in deltas.add(json.loads(line)):
                grown = sum(int(layer.counts.sum()) for layer in window.batch.layers)
                totals[window.batch.run] = totals.get(window.batch.run, 0) + grown
    result = {}
    for mode in ("counts", "tokens"):
        if mode in outputs:
            expected = sum(computed_tokens(o) for o in outputs[mode]) * layers * top_k
            total = totals.get(f"bench-{mode}", 0)
            result[mode] = {"expert_tokens_total": total, "expected": expected, "exact": total == expected}
    return result

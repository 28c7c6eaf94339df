"""Where otel-moe's time on vLLM's engine thread goes, in one real engine (a diagnostic, not a
benchmark: no `off` engine to compare with).

Wraps the recorder's begin_step / on_step in the model's process (over collective_rpc) and runs
three turns of the same batch: the first warms up, the second reads wall clock against the
thread's own CPU time (wall above CPU: waiting, for the GIL or a core), the third adds cProfile
(its own cost inflates every call; Python 3.12's cProfile sees every thread, vLLM's own
included). Spans go over OTLP/gRPC to an embedded collector, as in the bench.

    VLLM_LOG_MOE_MODE=counts|tokens python tools/engine_thread_split.py cuda|cpu MODEL_DIR
(engines need VLLM_ALLOW_INSECURE_SERIALIZATION=1; the script sets it.) A GPU's model: see
tools/bench_vllm.make_model. Results of an H200 run: bench/gpu_engine_thread_split_*.log.
"""
import json
import os
import sys
import time
from pathlib import Path


def install(worker) -> bool:
    recorder = worker.model_runner._otel_moe_recorder
    state = {"wall": 0, "cpu": 0, "profile": None, "steps_before": recorder.steps}
    for name in ("begin_step", "on_step"):
        original = getattr(recorder, name)

        def timed(*args, _original=original):
            profile = state["profile"]
            wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
            if profile is not None:
                profile.enable()
            try:
                return _original(*args)
            finally:
                if profile is not None:
                    profile.disable()
                state["wall"] += time.perf_counter_ns() - wall
                state["cpu"] += time.thread_time_ns() - cpu

        setattr(recorder, name, timed)  # the binding looks them up on the recorder each step
    worker._otel_moe_split = (recorder, state)
    return True


def reset(worker, profile: bool) -> bool:
    import cProfile

    recorder, state = worker._otel_moe_split
    state.update(wall=0, cpu=0, steps_before=recorder.steps, profile=cProfile.Profile() if profile else None)
    return True


def read(worker) -> dict:
    import pstats

    recorder, state = worker._otel_moe_split
    steps = max(recorder.steps - state["steps_before"], 1)
    result = {"steps": steps, "wall_us_step": round(state["wall"] / steps / 1000, 1),
              "cpu_us_step": round(state["cpu"] / steps / 1000, 1), "dropped": recorder.dropped_steps}
    if state["profile"] is not None:
        rows = sorted(pstats.Stats(state["profile"]).stats.items(), key=lambda kv: -kv[1][2])[:22]
        result["profile"] = "\n".join(
            f"{calls:6d} calls  self {own * 1e6 / steps:8.1f} us/step  cum {total * 1e6 / steps:8.1f} us/step  "
            f"{where[2]} {os.path.basename(where[0])}:{where[1]}"
            for where, (_, calls, own, total, _) in rows)
    return result


def main(device: str, model: str) -> None:
    from otel_moe.collector.process import CollectorProcess

    mode = os.environ.get("VLLM_LOG_MOE_MODE", "tokens")
    collector = CollectorProcess(Path(f"/tmp/otel-moe-split-{mode}"))
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc",
                      VLLM_LOG_MOE="otlp", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    from vllm import LLM, SamplingParams

    import engine_thread_split  # this module as the engine's processes import it
    from bench_engine import unique_prompts

    engine = dict(model=model, max_model_len=300, seed=0, max_num_seqs=256)
    if device == "cuda":
        engine.update(load_format="dummy", gpu_memory_utilization=0.45)
        prompts, prompt_len, gen_len = 1024, 128, 128
    else:
        engine.update(gpu_memory_utilization=0.05)
        prompts, prompt_len, gen_len = 256, 64, 32
    llm = LLM(**engine)
    llm.collective_rpc(engine_thread_split.install)
    params = SamplingParams(max_tokens=gen_len, ignore_eos=True, temperature=0.0, detokenize=False)
    base = [[(7 * i + 3 * j) % 500 + 1 for j in range(prompt_len)] for i in range(prompts)]  # the bench's batch
    for turn, profile in enumerate((False, False, True)):
        batch = [{"prompt_token_ids": ids} for ids in unique_prompts(base, turn)]
        llm.collective_rpc(engine_thread_split.reset, args=(profile,))
        started = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        result = llm.collective_rpc(engine_thread_split.read)[0]
        table = result.pop("profile", "")
        print(f"@@ {mode} turn {turn}: {prompts * gen_len / elapsed:.0f} tok/s {json.dumps(result)}", flush=True)
        if table:
            print(table, flush=True)
    llm.llm_engine.engine_core.shutdown()
    collector.stop()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(*sys.argv[1:3])

"""One benchmark engine in a process of its own, in vLLM's default topology (the
engine core in a child process, as `vllm serve` and a plain `LLM(...)` run it).

tools/bench.py starts one per mode, with that mode's otel-moe flags in the
environment, and drives them over stdin/stdout, one JSON line each way (``@@bench {...}`` from the engine):
  -> {"run": true}        <- {"tok_s": float,        generate the batch once (its prompts
                              "probe": {...}}        made unique to the run: no prefix-cache hits;
                                                     probe: what the model's process spent, engine_probe.py)
  -> {"profile": {"prompts": n, "gen_len": m}}       a short turn of the batch's first n prompts
                          <- {"profile": {...}}      under the torch profiler (GPU; engine_probe.py)
  -> {"quit": true}       <- {"outputs": path}       shut down, outputs of every run written
The first line out is {"ready": true, "start_s": float} once the engine is built.

    python -m tools.bench_engine SPEC.json
SPEC: {"mode", "engine": {LLM kwargs}, "prompts": [[token ids]], "gen_len", "outputs",
       "seed_style_log": path?  (hook the prototype's logger into the workers)}
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

PREFIX = "@@bench "  # vLLM prints to stdout too: protocol lines carry this


def say(message: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(**spec["engine"])
    from tools import engine_probe  # vLLM's processes import it too (PYTHONPATH holds the checkout)

    llm.collective_rpc(engine_probe.install)
    if spec.get("seed_style_log"):
        from tools import seed_style

        llm.collective_rpc(seed_style.install(spec["seed_style_log"]))
    say({"ready": True, "start_s": round(time.monotonic() - t0, 1)})
    params = SamplingParams(max_tokens=spec["gen_len"], ignore_eos=True, temperature=0.0, detokenize=False)
    outputs = []
    for run, line in enumerate(sys.stdin):
        command = json.loads(line)
        if command.get("quit"):
            break
        if command.get("profile"):
            summary, results = profiled_turn(llm, spec["prompts"], command["profile"], run)
            say({"profile": summary})
            outputs.extend(map(_output, results))  # recorded as any other turn's
            continue
        prompts = [{"prompt_token_ids": ids} for ids in unique_prompts(spec["prompts"], run)]
        before = llm.collective_rpc(engine_probe.read)[0]  # the first worker's (TP rank 0)
        t = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        after = llm.collective_rpc(engine_probe.read)[0]
        say({"tok_s": sum(len(r.outputs[0].token_ids) for r in results) / elapsed,
             "probe": engine_probe.spent(before, after)})
        outputs.extend(map(_output, results))
    llm.llm_engine.engine_core.shutdown()  # the workers' shutdown flushes otel-moe's exporters
    Path(spec["outputs"]).write_text(json.dumps(outputs))
    say({"outputs": spec["outputs"]})


def profiled_turn(llm, prompts: list[list[int]], turn: dict, run: int):
    """The first ``turn["prompts"]`` prompts (made unique, as a run's), ``turn["gen_len"]``
    tokens each, under the torch profiler in the model's process: (its summary, the outputs)."""
    from vllm import SamplingParams

    from tools import engine_probe

    batch = [{"prompt_token_ids": ids} for ids in unique_prompts(prompts[: turn["prompts"]], 10_000 + run)]
    params = SamplingParams(max_tokens=turn["gen_len"], ignore_eos=True, temperature=0.0, detokenize=False)
    llm.collective_rpc(engine_probe.profile_start)
    results = llm.generate(batch, params, use_tqdm=False)
    return llm.collective_rpc(engine_probe.profile_stop)[0], results


def _output(result) -> dict:
    return {"request_id": result.request_id, "prompt_token_ids": list(result.prompt_token_ids),
            "output_token_ids": list(result.outputs[0].token_ids), "num_cached_tokens": result.num_cached_tokens or 0}


def unique_prompts(prompts: list[list[int]], run: int) -> list[list[int]]:
    """The batch with its first two tokens made unique to this prompt and this run (as two
    base-500 digits, token ids 1..500): vLLM's prefix cache never hits, so every run of
    every engine computes the same tokens whatever the earlier runs left in its cache."""
    unique = []
    for i, ids in enumerate(prompts):
        key = run * len(prompts) + i
        unique.append([key // 500 % 500 + 1, key % 500 + 1, *ids[2:]])
    return unique


if __name__ == "__main__":
    main(sys.argv[1])

"""Run one offline vLLM generation and write what it produced as JSON.

Used by the tests as a subprocess (a fresh process per engine configuration,
the otel-moe flags coming from its environment). Usage:
  python tests/vllm_run.py SPEC.json OUT.json
SPEC: {"model", "prompts": [str], "max_tokens": int | [int], "eager": bool,
       "max_num_batched_tokens": int, "prefix_caching": bool, "tp": int?, "batches": [[prompt index]]?,
       "otlp_traces_endpoint": str?,
       "profile_dir": str?, "profile_batches": [batch index]?  (torch profiler around those batches),
       "control": {"path": str, "batches": [{field: value}]}?  (live control: the file is replaced with
                                          each batch's fields before that batch runs),
       "n": int | [int]?  (parallel sampling: each child is an output of its own, "<index>_<request id>"),
       "num_gpu_blocks": int?  (a KV cache that small preempts), "speculative": {speculative_config}?,
       "metrics": [vLLM metric name]?  (their values after the run, under "metrics"),
       "hold": str?  (after the last batch, wait until this file exists: the engine and its exporter
                     stay up while a test looks at them; "outputs" are written before),
       "worker_modules": [module name]?  (which of them each worker process has imported, after the run;
                                          needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 to send the check)}
"""
import json
import os
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    from vllm import LLM, SamplingParams

    extra = {}
    if spec.get("otlp_traces_endpoint"):
        extra = {"otlp_traces_endpoint": spec["otlp_traces_endpoint"], "disable_log_stats": False}
    if spec.get("profile_dir"):
        from vllm.config import ProfilerConfig

        extra["profiler_config"] = ProfilerConfig(profiler="torch", torch_profiler_dir=spec["profile_dir"],
                                                  torch_profiler_with_stack=False)
    if spec.get("metrics"):
        extra["disable_log_stats"] = False
    if spec.get("num_gpu_blocks"):
        extra["num_gpu_blocks_override"] = spec["num_gpu_blocks"]
    if spec.get("speculative"):
        extra["speculative_config"] = spec["speculative"]
    llm = LLM(
        model=spec["model"],
        enforce_eager=spec.get("eager", False),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 64),
        max_num_seqs=spec.get("max_num_seqs", 8),
        max_model_len=spec.get("max_model_len", 512),
        enable_prefix_caching=spec.get("prefix_caching", False),
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.2),
        tensor_parallel_size=spec.get("tp", 1),
        seed=0,
        **extra,
    )
    max_tokens = spec.get("max_tokens", 8)
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(spec["prompts"])
    n = spec.get("n", 1)
    if isinstance(n, int):
        n = [n] * len(spec["prompts"])
    # several samples of one prompt differ only when sampled (CPU refuses a per-request seed)
    params = [SamplingParams(temperature=0.0 if k == 1 else 1.0, max_tokens=m, ignore_eos=True, n=k)
              for m, k in zip(max_tokens, n)]
    outputs = []
    for index, batch in enumerate(spec.get("batches", [list(range(len(spec["prompts"])))])):
        prompts = [spec["prompts"][i] for i in batch]
        if spec.get("control"):
            _replace(spec["control"]["path"], json.dumps(spec["control"]["batches"][index]))
        profiled = index in spec.get("profile_batches", [])
        if profiled:
            llm.start_profile()
        results = llm.generate(prompts, [params[i] for i in batch], use_tqdm=False)
        if profiled:
            llm.stop_profile()
        for r in results:
            for c in r.outputs:
                outputs.append({
                    # vLLM runs each of n > 1 samples as a child request "<index>_<request id>"
                    "request_id": r.request_id if len(r.outputs) == 1 else f"{c.index}_{r.request_id}",
                    "parent_request_id": r.request_id,
                    "prompt_token_ids": list(r.prompt_token_ids),
                    "output_token_ids": list(c.token_ids),
                    "num_cached_tokens": r.num_cached_tokens or 0,
                })
    result = {"outputs": outputs}
    if spec.get("hold"):
        json.dump(result, open(out_path, "w"))
        deadline = time.monotonic() + 300
        while not os.path.exists(spec["hold"]) and time.monotonic() < deadline:
            time.sleep(0.1)
    if spec.get("metrics"):
        result["metrics"] = {m.name: getattr(m, "value", None) or getattr(m, "values", None) or 0
                             for m in llm.get_metrics() if m.name in spec["metrics"]}
    if spec.get("worker_modules"):
        result["worker_modules_loaded"] = llm.collective_rpc(_loaded_modules, args=(spec["worker_modules"],))
    json.dump(result, open(out_path, "w"))


def _replace(path: str, text: str) -> None:
    """As the control endpoints write: a new file renamed over the old (a new inode)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _loaded_modules(worker, names: list[str]) -> list[str]:
    """Runs in a worker process: which of ``names`` it has imported."""
    return [name for name in names if name in sys.modules]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

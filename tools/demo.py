"""`make demo`: the whole pipeline on a tiny embedded model.

tiny random-weight Qwen2-MoE -> vLLM (offline, routing over OTLP, vLLM's own
request tracing on, its torch profiler around the batch) -> the embedded
collector (OTLP/JSON files) -> the report, with the profiler trace joined.
A second batch, sent after `otel-moe control stop`, shows live control: it
is served but not recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "the expert router sends every token to a few experts",
    "Hello, world! 12 + 5 = 17.",
    "a mixture of experts is fast because most experts rest while others work",
    "telemetry shows the routing layer by layer",
] * 4

GENERATE = """
import json, subprocess, sys
from vllm import LLM, SamplingParams
from vllm.config import ProfilerConfig
if __name__ == "__main__":
    model, prompts, traces, profile_dir, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    # vLLM's request spans (TTFT, e2e) need both settings offline.
    llm = LLM(model=model, gpu_memory_utilization=0.2, max_model_len=512, max_num_batched_tokens=64,
              otlp_traces_endpoint=traces, disable_log_stats=False,
              profiler_config=ProfilerConfig(profiler="torch", torch_profiler_dir=profile_dir,
                                             torch_profiler_with_stack=False))
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    llm.start_profile()
    recorded = llm.generate(prompts, params, use_tqdm=False)
    llm.stop_profile()
    subprocess.run([sys.executable, "-m", "otel_moe.cli", "control", "stop"], check=True, stdout=subprocess.DEVNULL)
    served = llm.generate(prompts[:4], params, use_tqdm=False)
    tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in recorded)
    json.dump({"recorded": len(recorded), "tokens": tokens, "served_unrecorded": len(served)}, open(result, "w"))
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    for old in ("collected", "report", "profile", "control.json.workers"):
        shutil.rmtree(out / old, ignore_errors=True)
    (out / "control.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model, log = out / "model", out / "vllm.log"
    from otel_moe import tiny_model

    print("1/4 building a tiny random-weight Qwen2-MoE (4 layers, 8 experts, top-2) ...", flush=True)
    tiny_model.build(str(model), "qwen2_moe")

    from otel_moe.collector.process import CollectorProcess

    collector = CollectorProcess(out / "collected")
    endpoint = collector.grpc_endpoint
    print(f"2/4 embedded collector listening: OTLP/gRPC {endpoint}, OTLP/HTTP {collector.http_endpoint}", flush=True)
    print(f"3/4 vLLM generating {len(PROMPTS)} requests with routing over OTLP, its request tracing and its torch "
          f"profiler on, then 4 more after 'otel-moe control stop' (vLLM's log: {log}) ...", flush=True)
    try:
        env = dict(os.environ, VLLM_LOG_MOE="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                   OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc", OTEL_SERVICE_NAME="otel-moe-demo",
                   VLLM_LOG_MOE_CONTROL=str(out / "control.json"))
        with open(log, "w") as f:
            vllm = subprocess.run([sys.executable, "-c", GENERATE, str(model), json.dumps(PROMPTS), endpoint,
                                   str(out / "profile"), str(out / "generated.json")],
                                  env=env, stdout=f, stderr=subprocess.STDOUT)
    finally:
        collector.stop()
    if vllm.returncode != 0:
        print(f"vLLM failed (exit {vllm.returncode}); the end of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]),
              file=sys.stderr)
        return 1
    generated = json.loads((out / "generated.json").read_text())

    print("4/4 the report ...", flush=True)
    from otel_moe.report.main import build_report
    from otel_moe.report.summary import print_summary

    result = build_report([str(out / "collected"), str(out / "profile")], str(out / "report"))
    print(f"""
Recorded {generated['recorded']} requests, {generated['tokens']} tokens through {len(result['layers'])} MoE layers \
(tokens mode); {generated['served_unrecorded']} more were served after 'otel-moe control stop' and not recorded.
""")
    print_summary(result)
    print(f"""
  collector files (OTLP/JSON lines):  {out / 'collected'}
  torch profiler trace (Perfetto):    {out / 'profile'}
  vLLM's log:                         {log}
  report:                             {out / 'report' / 'report.html'}""")
    return 0


if __name__ == "__main__":
    sys.exit(main())

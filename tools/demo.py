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
    model, prompts, traces, profile_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    # vLLM's request spans (TTFT, e2e) need both settings offline.
    llm = LLM(model=model, gpu_memory_utilization=0.2, max_model_len=512, max_num_batched_tokens=64,
              otlp_traces_endpoint=traces, disable_log_stats=False,
              profiler_config=ProfilerConfig(profiler="torch", torch_profiler_dir=profile_dir,
                                             torch_profiler_with_stack=False))
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    llm.start_profile()
    for out in llm.generate(prompts, params, use_tqdm=False):
        print(f"request {out.request_id}: {len(out.prompt_token_ids)} prompt + {len(out.outputs[0].token_ids)} generated tokens")
    llm.stop_profile()
    subprocess.run([sys.executable, "-m", "otel_moe.cli", "control", "stop"], check=True)
    served = llm.generate(prompts[:4], params, use_tqdm=False)
    print(f"{len(served)} more requests served after 'otel-moe control stop': not recorded")
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    for old in ("collected", "report", "profile", "control.json"):
        shutil.rmtree(out / old, ignore_errors=True)
    (out / "control.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    from otel_moe import tiny_model

    tiny_model.build(str(model), "qwen2_moe")
    print(f"tiny model: {model}")

    from otel_moe.collector.process import CollectorProcess

    collector = CollectorProcess(out / "collected")
    endpoint = collector.grpc_endpoint
    print(f"embedded collector: OTLP/gRPC {endpoint}, OTLP/HTTP {collector.http_endpoint}")
    try:
        env = dict(os.environ, VLLM_LOG_MOE="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                   OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc", OTEL_SERVICE_NAME="otel-moe-demo",
                   VLLM_LOG_MOE_CONTROL=str(out / "control.json"))
        subprocess.run([sys.executable, "-c", GENERATE, str(model), json.dumps(PROMPTS), endpoint, str(out / "profile")],
                       env=env, check=True)
    finally:
        collector.stop()
    print(f"collector files (OTLP/JSON, one export per line): {out / 'collected'}")
    print(f"torch.profiler trace (open in ui.perfetto.dev: otel_moe.step / otel_moe.layer ranges): {out / 'profile'}")

    from otel_moe.report.main import build_report
    from otel_moe.summary import print_summary

    print()
    print_summary(build_report([str(out / "collected"), str(out / "profile")], str(out / "report")))
    print(f"\nreport: {out / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the whole pipeline on a tiny embedded model.

Builds a random-weight Qwen2-MoE, runs an offline vLLM generation with routing
logged, and prints where the output went and a per-layer summary.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "the expert router sends every token to a few experts",
    "Hello, world! 12 + 5 = 17.",
    "a mixture of experts is fast because most experts rest while others work",
    "telemetry shows the routing layer by layer",
]

GENERATE = """
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=model, gpu_memory_utilization=0.2, max_model_len=512, max_num_batched_tokens=64)
    for out in llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False):
        print(f"request {out.request_id}: {len(out.prompt_token_ids)} prompt + {len(out.outputs[0].token_ids)} generated tokens")
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    routing = out / "routing.jsonl"
    routing.unlink(missing_ok=True)  # the sink appends; the demo wants a fresh log
    from otel_moe import tiny_model

    tiny_model.build(str(model), "qwen2_moe")
    print(f"tiny model: {model}")
    import json

    env = dict(os.environ, VLLM_LOG_MOE=str(routing))
    subprocess.run([sys.executable, "-c", GENERATE, str(model), json.dumps(PROMPTS)], env=env, check=True)
    print(f"\nrouting log (one JSON object per token per layer): {routing}")
    from otel_moe.summary import print_jsonl_summary

    return print_jsonl_summary(str(routing))


if __name__ == "__main__":
    sys.exit(main())

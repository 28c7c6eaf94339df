"""Live control on one in-process engine, on whatever device is there: record
everything, switch to two layers in counts mode, then to two other layers in
tokens mode, then stop; check each phase's records exactly.

The tests do this on CPU through `vllm serve`; this script is for a GPU machine,
where CUDA graphs replay the capture and the snapshot selects layers on the device.
Usage: python -m tools.control_check OUT_DIR [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    routing, control = out / "control-check.jsonl", out / "control-check.json"
    for path in (routing, control):
        path.unlink(missing_ok=True)
    os.environ.update(VLLM_LOG_MOE=str(routing), VLLM_LOG_MOE_CONTROL=str(control),
                      VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    from vllm import LLM, SamplingParams

    from otel_moe.config import parse_layers
    from otel_moe.control import ControlFile, ControlState
    from tools.bench_vllm import make_model

    layers = 12 if args.device == "cuda" else 4
    model, info = make_model(out, args.device, layers)
    llm = LLM(model=model, max_model_len=256, seed=0, max_num_seqs=64, distributed_executor_backend="uni",
              gpu_memory_utilization=0.12 if args.device == "cuda" else 0.05,
              **({"load_format": info["load_format"]} if info.get("load_format") else {}))
    params = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0, detokenize=False)
    base, file = ControlState(True, parse_layers("all"), "tokens"), ControlFile(str(control))
    phases = [({}, "all layers, tokens"), ({"layers": "1,3", "mode": "counts"}, "layers 1,3, counts"),
              ({"layers": "0,2", "mode": "tokens"}, "layers 0,2, tokens"), ({"recording": False}, "stopped")]
    sent = {}
    for index, (changes, name) in enumerate(phases):
        if changes:
            file.update(changes, base)
        prompts = [{"prompt_token_ids": [(index * 31 + 7 * i + j) % 500 + 1 for j in range(24 + i)]} for i in range(48)]
        results = llm.generate(prompts, params, use_tqdm=False)
        sent[name] = {r.request_id: len(r.prompt_token_ids) + len(r.outputs[0].token_ids) - 1 for r in results}
    llm.llm_engine.engine_core.shutdown()  # flushes the sink
    rows = [json.loads(line) for line in routing.read_text().splitlines()]
    problems = check(rows, sent)
    report = {"device": args.device, "rows": len(rows), "problems": problems[:20], "exact": not problems}
    (out / "control-check-result.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if not problems else 1


def check(rows: list[dict], sent: dict) -> list[str]:
    problems = []
    positions = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if "expert_ids" in r:
            positions[r["request_id"]][r["layer"]].append(r["position"])
    for name, layers in (("all layers, tokens", None), ("layers 0,2, tokens", [0, 2])):
        for request_id, tokens in sent[name].items():
            got = positions.pop(request_id, {})
            want = layers or sorted(got) or ["?"]
            if sorted(got) != want:
                problems.append(f"{name}: request {request_id} has layers {sorted(got)}, expected {want}")
            for layer, p in got.items():
                if sorted(p) != list(range(tokens)):
                    problems.append(f"{name}: request {request_id} layer {layer}: {len(p)} positions, expected 0..{tokens - 1}")
    if positions:
        problems.append(f"token rows of requests sent in counts mode or while stopped: {sorted(positions)[:5]}")
    counts = [r for r in rows if "counts" in r]
    if {r["layer"] for r in counts} != {1, 3}:
        problems.append(f"counts rows on layers {sorted({r['layer'] for r in counts})}, expected [1, 3]")
    for layer in (1, 3):
        total = sum(r["num_tokens"] for r in counts if r["layer"] == layer)
        if total != sum(sent["layers 1,3, counts"].values()):
            problems.append(f"counts layer {layer}: {total} tokens, expected {sum(sent['layers 1,3, counts'].values())}")
    return problems


if __name__ == "__main__":
    sys.exit(main())

"""Pool the rounds of several GPU throughput runs of the same code and setup
(`tools/bench.py --device cuda` files), where one run's rounds are too few to tell
0.97 from 0.99. Each round stays paired with the `off` engine of its own run and
round, as bench_vllm.py's own ratio does; nothing is compared across machines.

    python3 tools/pool_gpu_runs.py bench/gpu_results.json bench/gpu_results_2.json
"""
from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vllm import ratio_to_pooled_off  # noqa: E402

SAME_SETUP = ("model", "device", "topology", "prompts", "prompt_len", "gen_len", "max_num_seqs", "modes")


def pool(runs: list[dict]) -> dict:
    first = runs[0]
    for run in runs[1:]:
        differs = [key for key in SAME_SETUP if run.get(key) != first.get(key)]
        if differs:
            raise SystemExit(f"runs differ in {', '.join(differs)}: not pooled")
    modes = first["modes"]
    per_round = {mode: [r for run in runs for r in run["ratio_per_round"][mode]] for mode in modes if mode != "off"}
    samples = {mode: [s for run in runs for s in run["samples_tok_s"][mode]] for mode in modes}
    return {
        "runs": len(runs),
        "rounds": sum(run["rounds_counted"] for run in runs),
        "ratio": {mode: round(statistics.median(values), 3) for mode, values in per_round.items()},
        "ratio_method": first["ratio_method"] + ", over the rounds of every run",
        "ratio_to_pooled_off": ratio_to_pooled_off(samples),
        "ratio_to_both_off_by_round": ratio_to_both_off_by_round(runs),
        "off2_by_run": [run["ratio"]["off2"] for run in runs],
        "engine_thread_us_per_step": {
            mode: round(statistics.median(us for run in runs for us in run["engine_thread_us_per_step_per_round"][mode]), 1)
            for mode in first["engine_thread_us_per_step_per_round"]},
        "exact": all(run["exactness"]["exact"] for run in runs),
        "records": sum(run["exactness"]["records"] for run in runs),
        "dropped_steps_max": max(run["dropped_steps_max"] for run in runs),
    }


def ratio_to_both_off_by_round(runs: list[dict], resamples: int = 4000) -> dict:
    """Each round's throughput over the geometric mean of that round's two `off` engines
    (one stray `off` engine moves it half as far), median over rounds, with a 90%
    bootstrap interval."""
    rng = random.Random(0)
    result = {}
    for mode in ("counts", "tokens"):
        values = [run["samples_tok_s"][mode][i] / (run["samples_tok_s"]["off"][i] * run["samples_tok_s"]["off2"][i]) ** 0.5
                  for run in runs if mode in run["samples_tok_s"] for i in range(len(run["samples_tok_s"][mode]))]
        if not values:
            continue
        boot = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
        result[mode] = {"ratio": round(statistics.median(values), 3),
                        "interval_90": [round(boot[int(0.05 * resamples)], 3), round(boot[int(0.95 * resamples)], 3)]}
    return result


def main(paths: list[str]) -> None:
    if len(paths) < 2:
        raise SystemExit(__doc__)
    print(json.dumps(pool([json.loads(Path(p).read_text())["vllm_gpu"] for p in paths]), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Pool the rounds of several GPU throughput runs of the same setup
(`tools/bench.py --device cuda` files), where one run's rounds are too few to tell
0.97 from 0.99. Each round stays paired with the `off` engine of its own run and
round, as bench_vllm.py's own ratio does; nothing is compared across machines.
Runs may have run different modes beside `off` and `off2` (which every run needs): each
mode is pooled over the runs that have it (and the switched engine's within-process
ratios over the runs that have those).

    python -m tools.pool_gpu_runs bench/2026-12-01-h200-offline-8rounds.json bench/2026-12-03-h200-offline-8rounds.json
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from tools.bench_vllm import median_interval, ratio_to_pooled_off  # noqa: E402

SAME_SETUP = ("model", "device", "topology", "prompts", "prompt_len", "gen_len", "max_num_seqs")


def pool(runs: list[dict]) -> dict:
    first = runs[0]
    for run in runs[1:]:
        differs = [key for key in SAME_SETUP if run.get(key) != first.get(key)]
        if differs:
            raise SystemExit(f"runs differ in {', '.join(differs)}: not pooled")
    if any(not {"off", "off2"} <= set(run["modes"]) for run in runs):
        raise SystemExit("every run needs its off and off2 engines: not pooled")
    modes = list(dict.fromkeys(mode for run in runs for mode in run["modes"]))
    having = {mode: [run for run in runs if mode in run["modes"]] for mode in modes}
    within = [r for run in runs if run.get("within_process") for r in run["within_process"]["ratio_per_round"]]
    per_round = {mode: [r for run in having[mode] for r in run["ratio_per_round"][mode]] for mode in modes if mode != "off"}
    samples = {mode: [s for run in having[mode] for s in run["samples_tok_s"][mode]] for mode in modes}
    engine_thread = {mode: [us for run in runs for us in run["engine_thread_us_per_step_per_round"].get(mode, [])]
                     for mode in modes}
    return {
        "runs": len(runs),
        "rounds": sum(run["rounds_counted"] for run in runs),
        "modes": modes,
        "rounds_by_mode": {mode: sum(run["rounds_counted"] for run in having[mode]) for mode in modes},
        "ratio": {mode: round(statistics.median(values), 3) for mode, values in per_round.items()},
        "ratio_method": first["ratio_method"] + ", over the rounds of every run that has the mode",
        "ratio_to_pooled_off": ratio_to_pooled_off(samples),
        "ratio_to_both_off_by_round": ratio_to_both_off_by_round(having),
        "within_process": {"ratio": round(statistics.median(within), 3), "interval_90": median_interval(within),
                           "rounds": len(within)} if within else None,
        "off2_by_run": [run["ratio"]["off2"] for run in runs],
        "engine_thread_us_per_step": {mode: round(statistics.median(us), 1) for mode, us in engine_thread.items() if us},
        "exact": all(run["exactness"]["exact"] for run in runs),
        "records": sum(run["exactness"]["records"] for run in runs),
        "dropped_steps_max": max(run["dropped_steps_max"] for run in runs),
    }


def ratio_to_both_off_by_round(having: dict[str, list[dict]]) -> dict:
    """Each round's throughput over the geometric mean of that round's two `off` engines
    (one stray `off` engine moves it half as far), median over rounds, with a 90%
    bootstrap interval; ``having``: each mode's runs."""
    result = {}
    for mode, runs in having.items():
        if mode in ("off", "off2"):
            continue
        values = [run["samples_tok_s"][mode][i] / (run["samples_tok_s"]["off"][i] * run["samples_tok_s"]["off2"][i]) ** 0.5
                  for run in runs for i in range(len(run["samples_tok_s"][mode]))]
        result[mode] = {"ratio": round(statistics.median(values), 3), "interval_90": median_interval(values)}
    return result


def main(paths: list[str]) -> None:
    if len(paths) < 2:
        raise SystemExit(__doc__)
    print(json.dumps(pool([json.loads(Path(p).read_text())["vllm_gpu"] for p in paths]), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])

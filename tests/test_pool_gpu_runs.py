"""tools/pool_gpu_runs.py pools the rounds of GPU runs of one setup, each round still paired
with its own run's `off` engines, and refuses runs of different setups."""
from __future__ import annotations

import pytest

from tools.pool_gpu_runs import pool  # noqa: E402


def run(off, off2, counts, tokens, ratio_off2, prompts=1024):
    rounds = len(off)
    return {"model": "m", "device": "cuda", "topology": "default", "prompts": prompts, "prompt_len": 128,
            "gen_len": 128, "max_num_seqs": 256, "modes": ["off", "off2", "counts", "tokens"],
            "rounds_counted": rounds, "ratio_method": "median over rounds",
            "samples_tok_s": {"off": off, "off2": off2, "counts": counts, "tokens": tokens},
            "ratio_per_round": {"off2": [b / a for a, b in zip(off, off2)],
                                "counts": [b / a for a, b in zip(off, counts)],
                                "tokens": [b / a for a, b in zip(off, tokens)]},
            "ratio": {"off2": ratio_off2},
            "engine_thread_us_per_step_per_round": {"counts": [100.0] * rounds, "tokens": [200.0] * rounds},
            "exactness": {"exact": True, "records": 10 * rounds}, "dropped_steps_max": 0}


def test_rounds_of_both_runs_are_pooled_each_against_its_own_off():
    fast = run([200.0, 200.0], [200.0, 200.0], [200.0, 200.0], [196.0, 196.0], 1.0)  # tokens 0.98
    slow = run([100.0], [100.0], [100.0], [90.0], 1.0)  # tokens 0.90
    pooled = pool([fast, slow])
    assert pooled["rounds"] == 3 and pooled["records"] == 30 and pooled["exact"]
    assert pooled["ratio"] == {"off2": 1.0, "counts": 1.0, "tokens": 0.98}  # median of 0.98, 0.98, 0.90
    assert pooled["ratio_to_both_off_by_round"]["tokens"]["ratio"] == 0.98
    # medians of the pooled samples: tokens 196 over off 200
    assert pooled["ratio_to_pooled_off"]["tokens"]["ratio"] == 0.98
    assert pooled["engine_thread_us_per_step"] == {"counts": 100.0, "tokens": 200.0}


def test_a_stray_off_engine_moves_the_both_off_ratio_half_as_far():
    pooled = pool([run([100.0], [121.0], [110.0], [110.0], 1.21), run([100.0], [121.0], [110.0], [110.0], 1.21)])
    assert pooled["ratio"]["tokens"] == 1.1  # against off alone
    assert pooled["ratio_to_both_off_by_round"]["tokens"]["ratio"] == 1.0  # sqrt(100 * 121) = 110


def test_runs_of_different_setups_are_refused():
    with pytest.raises(SystemExit, match="prompts"):
        pool([run([1.0], [1.0], [1.0], [1.0], 1.0), run([1.0], [1.0], [1.0], [1.0], 1.0, prompts=256)])


def test_each_mode_is_pooled_over_the_runs_that_have_it_and_so_are_the_within_process_rounds():
    with_counts = run([100.0], [100.0], [110.0], [96.0], 1.0)  # counts 1.1, tokens 0.96
    switched = run([200.0, 200.0], [200.0, 200.0], [200.0, 200.0], [200.0, 200.0], 1.0)  # tokens 1.0
    switched["modes"] = ["off", "off2", "tokens"]
    del switched["samples_tok_s"]["counts"], switched["ratio_per_round"]["counts"]
    del switched["engine_thread_us_per_step_per_round"]["counts"]
    switched["within_process"] = {"ratio_per_round": [1.02, 0.98]}
    pooled = pool([with_counts, switched])
    assert pooled["modes"] == ["off", "off2", "counts", "tokens"]
    assert pooled["rounds_by_mode"] == {"off": 3, "off2": 3, "counts": 1, "tokens": 3}
    assert pooled["ratio"] == {"off2": 1.0, "counts": 1.1, "tokens": 1.0}  # tokens: median of 0.96, 1.0, 1.0
    assert pooled["ratio_to_both_off_by_round"]["counts"]["ratio"] == 1.1
    assert pooled["within_process"]["ratio"] == 1.0 and pooled["within_process"]["rounds"] == 2
    assert pooled["engine_thread_us_per_step"] == {"counts": 100.0, "tokens": 200.0}


def test_runs_without_a_noise_control_are_refused():
    lone = run([1.0], [1.0], [1.0], [1.0], 1.0)
    lone["modes"] = ["off", "tokens"]
    with pytest.raises(SystemExit, match="off2"):
        pool([lone, run([1.0], [1.0], [1.0], [1.0], 1.0)])

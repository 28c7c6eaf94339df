"""The report's pictures (matplotlib, Agg: no display needed)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from otel_moe.report.aggregate import RunStats  # noqa: E402

DPI = 100


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=DPI)
    plt.close(fig)
    return name


def expert_histogram(out_dir: str, layer: str, counts: list[int]) -> str:
    counts = np.asarray(counts)
    fig, ax = plt.subplots(figsize=(max(6, len(counts) * 0.18), 3.5))
    ax.bar(np.arange(len(counts)), counts, color="#4c72b0")
    ax.axhline(counts.sum() / len(counts), color="#c44e52", linestyle="--", label="uniform share")
    ax.set_xlabel("expert")
    ax.set_ylabel("routed tokens (x top-k slots)")
    ax.set_title(f"layer {layer}: expert usage ({counts.sum() } assignments)")
    ax.legend(loc="upper right")
    return _save(fig, out_dir, f"expert_hist_layer{layer}.png")


def phase_histogram(out_dir: str, layer: str, prefill: list[int], decode: list[int]) -> str:
    prefill, decode = np.asarray(prefill, float), np.asarray(decode, float)
    x = np.arange(len(prefill))
    fig, ax = plt.subplots(figsize=(max(6, len(x) * 0.22), 3.5))
    for offset, values, label, color in ((-0.2, prefill, "prefill", "#55a868"), (0.2, decode, "decode", "#dd8452")):
        share = values / values.sum() if values.sum() else values
        ax.bar(x + offset, share, width=0.4, label=f"{label} ({int(values.sum())})", color=color)
    ax.axhline(1 / len(x), color="#c44e52", linestyle="--", label="uniform share")
    ax.set_xlabel("expert")
    ax.set_ylabel("share of the phase's assignments")
    ax.set_title(f"layer {layer}: prefill vs decode")
    ax.legend(loc="upper right")
    return _save(fig, out_dir, f"expert_hist_layer{layer}_by_phase.png")


def heatmap(out_dir: str, layers: dict[str, dict]) -> str:
    names = list(layers)
    width = max(len(v["counts"]) for v in layers.values())
    share = np.zeros((len(names), width))
    for i, name in enumerate(names):
        c = np.asarray(layers[name]["counts"], float)
        share[i, : len(c)] = c / c.sum() if c.sum() else 0
    fig, ax = plt.subplots(figsize=(max(6, width * 0.2 + 2), max(3, len(names) * 0.3 + 1.5)))
    image = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"share of each layer's assignments (uniform = {1 / width:.3f})")
    fig.colorbar(image, ax=ax, label="share")
    return _save(fig, out_dir, "expert_heatmap.png")


def imbalance(out_dir: str, runs: dict[str, RunStats]) -> str:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    several = len(runs) > 1
    for run_name, run in runs.items():
        for layer in sorted(run.layers):
            ls = run.layers[layer]
            label = f"{run_name} L{layer}" if several else f"layer {layer}"
            top.plot(ls.max_over_mean.x, ls.max_over_mean.y, linewidth=0.8, label=label)
            bottom.plot(ls.cv.x, ls.cv.y, linewidth=0.8, label=label)
    top.axhline(1.0, color="gray", linestyle=":")
    top.set_ylabel("max / mean expert load")
    top.set_title("load imbalance per step (1 = perfectly balanced)")
    bottom.set_ylabel("coefficient of variation")
    bottom.set_xlabel("engine step")
    if sum(len(r.layers) for r in runs.values()) <= 16:
        top.legend(fontsize="small", ncol=4)
    return _save(fig, out_dir, "load_imbalance.png")


def latency(out_dir: str, requests: dict[str, dict]) -> str | None:
    rows = [r for r in requests.values() if r["e2e_s"] is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, key, title in ((axes[0, 0], "ttft_s", "time to first token"), (axes[0, 1], "e2e_s", "end-to-end latency"),
                           (axes[1, 0], "tpot_s", "time per output token")):
        values = [r[key] * 1000 for r in rows if r[key] is not None]
        ax.hist(values, bins=min(40, max(5, len(values) // 2)), color="#4c72b0")
        ax.set_xlabel("ms")
        ax.set_ylabel("requests")
        ax.set_title(f"{title} ({len(values)} requests)")
    spread = [(r["expert_entropy_bits"], r["e2e_s"] * 1000) for r in rows if r["expert_entropy_bits"] is not None]
    ax = axes[1, 1]
    if spread:
        ax.scatter(*zip(*spread), s=12, color="#8172b2")
    ax.set_xlabel("expert-usage spread of the request (entropy, bits)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("latency against expert spread")
    return _save(fig, out_dir, "latency.png")


def profile(out_dir: str, joined: dict) -> str | None:
    """MoE time per layer (from the profiler trace) beside the same steps' imbalance."""
    layers = joined["layers"]
    if not layers:
        return None
    names = list(layers)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    x = np.arange(len(names))
    left.bar(x, [layers[n]["moe_us_mean"] for n in names], color="#4c72b0")
    left.set_xticks(x, names)
    left.set_xlabel("layer")
    left.set_ylabel("MoE time per step (µs)", color="#4c72b0")
    twin = left.twinx()
    imbalance = [layers[n]["imbalance_max_over_mean_mean"] for n in names]
    twin.plot(x, [np.nan if v is None else v for v in imbalance], "o-", color="#c44e52")
    twin.set_ylabel("max / mean expert load", color="#c44e52")
    left.set_title(f"per layer, over {joined['steps_joined']} profiled steps")
    points = np.asarray(joined["points"], dtype=float).reshape(-1, 5)
    if len(points):
        scatter = right.scatter(points[:, 3], points[:, 2] / points[:, 4], c=points[:, 0], s=10, cmap="viridis")
        fig.colorbar(scatter, ax=right, label="layer")
    right.set_xlabel("max / mean expert load in the step")
    right.set_ylabel("MoE time per token (µs)")
    right.set_title("each (step, layer): time against imbalance")
    return _save(fig, out_dir, "profile_moe_time.png")

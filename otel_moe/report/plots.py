"""The report's pictures (matplotlib, Agg: no display needed). Every figure
stays readable from 1 to ~100 layers and 8 to 256 experts: heatmaps instead of
one line per layer, grids of small histograms instead of one image per layer,
legends outside the data, at most ~32 tick labels per axis."""
from __future__ import annotations

import os
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, PowerNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from otel_moe.report.aggregate import POSITION_BUCKETS, WEIGHT_BIN, RunStats  # noqa: E402

DPI = 100
MAX_TICKS = 32
LAYERS_PER_PAGE = 24  # histogram grid: 6 rows x 4 columns
GRID_COLUMNS = 4
MAX_INCHES = 16
BLUE, RED, GREEN, ORANGE, PURPLE = "#4c72b0", "#c44e52", "#55a868", "#dd8452", "#8172b2"


def save(fig, out_dir: str, name: str) -> str:
    fig.savefig(os.path.join(out_dir, name), dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return name


def layer_ticks(ax, names: list, axis: str = "y") -> None:
    """Label every layer up to MAX_TICKS of them, else every n-th."""
    every = max(1, -(-len(names) // MAX_TICKS))
    positions = list(range(0, len(names), every))
    setter = ax.set_yticks if axis == "y" else ax.set_xticks
    setter(positions, [str(names[i]) for i in positions])


def expert_axis(axis) -> None:
    """Experts are whole numbers: no 0.5 ticks on a 4-expert axis."""
    axis.set_major_locator(MaxNLocator(integer=True))


def _share(counts) -> np.ndarray:
    c = np.asarray(counts, float)
    return c / c.sum() if c.sum() else c


def heatmap(out_dir: str, layers: dict[str, dict]) -> str:
    names = list(layers)
    width = max(len(v["counts"]) for v in layers.values())
    share = np.zeros((len(names), width))
    for i, name in enumerate(names):
        c = _share(layers[name]["counts"])
        share[i, : len(c)] = c
    fig, ax = plt.subplots(figsize=(min(MAX_INCHES, max(6, width * 0.12 + 2)), min(MAX_INCHES, max(3, len(names) * 0.16 + 1.5))))
    image = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    layer_ticks(ax, names)
    ax.set_xlabel("expert")
    expert_axis(ax.xaxis)
    ax.set_ylabel("layer")
    ax.set_title(f"share of each layer's assignments (uniform = {1 / width:.3g})")
    fig.colorbar(image, ax=ax, label="share")
    return save(fig, out_dir, "expert_heatmap.png")


def imbalance_heatmap(out_dir: str, run: RunStats) -> Optional[str]:
    """Layer x step (or window) of max/mean load, the steps' token counts above it."""
    grid = run.grid
    names = sorted(run.layers)
    if not grid.steps or not names:
        return None
    matrix = np.full((len(names), len(grid.steps)), np.nan)
    for j, values in enumerate(grid.values):
        for i, layer in enumerate(names):
            matrix[i, j] = values.get(layer, np.nan)
    fig, (top, ax) = plt.subplots(2, 1, figsize=(12, min(MAX_INCHES, max(4, len(names) * 0.14 + 2.5))), sharex=True,
                                  gridspec_kw={"height_ratios": [1, 4]})
    x = np.arange(len(grid.steps))
    top.bar(x, grid.tokens, width=1.0, color="#999999")
    top.set_ylabel("tokens\nper window" if _windowed(run) else "tokens\nper step")
    per = f" ({grid.width} steps per column, averaged)" if grid.width > 1 else ""
    top.set_title(f"load imbalance per layer and step: busiest expert / mean{per}")
    top.set_xlim(-0.5, len(grid.steps) - 0.5)
    image = ax.imshow(matrix, aspect="auto", cmap="magma", interpolation="nearest",
                      extent=(-0.5, len(grid.steps) - 0.5, len(names) - 0.5, -0.5))
    layer_ticks(ax, names)
    labels = list(range(0, len(grid.steps), max(1, len(grid.steps) // 8)))
    ax.set_xticks(labels, [str(grid.steps[i]) for i in labels])
    ax.set_xlabel("window of engine steps (its first step)" if _windowed(run) else "engine step")
    ax.set_ylabel("layer")
    # beside the heatmap, outside both axes: the bars above keep the heatmap's width and columns
    fig.colorbar(image, cax=ax.inset_axes([1.01, 0, 0.015, 1]), label="max / mean (1 = balanced)")
    return save(fig, out_dir, "imbalance_heatmap.png")


def imbalance(out_dir: str, run: RunStats) -> str:
    """Over time: one line per layer up to 8 layers, else the spread across layers."""
    fig, ax = plt.subplots(figsize=(10, 4))
    layers = sorted(run.layers)
    few = max((len(run.layers[layer].max_over_mean.x) for layer in layers), default=0) < 20
    marker = "o" if few else None  # a run of one window is one point: a line alone would not show it
    if len(layers) <= 8:
        for layer in layers:
            s = run.layers[layer].max_over_mean
            ax.plot(s.x, s.y, linewidth=0.8, marker=marker, markersize=4, label=f"layer {layer}")
    else:
        x, ys = _aligned([run.layers[layer].max_over_mean for layer in layers])
        if len(x):
            ax.fill_between(x, np.nanpercentile(ys, 10, axis=0), np.nanpercentile(ys, 90, axis=0), color=BLUE, alpha=0.25,
                            label="10th-90th percentile of layers")
            ax.plot(x, np.nanmedian(ys, axis=0), color=BLUE, linewidth=1, marker=marker, label="median layer")
            ax.plot(x, np.nanmax(ys, axis=0), color=RED, linewidth=0.8, marker=marker, label="most imbalanced layer")
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_ylabel("max / mean expert load")
    windowed = _windowed(run)
    ax.set_xlabel("window of engine steps (its first step)" if windowed else "engine step")
    ax.set_title(f"load imbalance per {'window' if windowed else 'step'} (1 = perfectly balanced)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return save(fig, out_dir, "load_imbalance.png")


def _windowed(run: RunStats) -> bool:
    """Counts mode alone: the run's records are windows of steps."""
    return "tokens" not in run.modes


def _aligned(series: list) -> tuple[np.ndarray, np.ndarray]:
    """Series of different layers on the x of the longest one (all layers see the same steps)."""
    longest = max(series, key=lambda s: len(s.x))
    x = np.asarray(longest.x, float)
    ys = np.vstack([np.interp(x, s.x, s.y, left=np.nan, right=np.nan) if len(s.x) else np.full(len(x), np.nan) for s in series])
    return x, ys


def _small_multiples(count: int, columns: int, width: float, height: float, extra_height: float = 0.0):
    """A figure of ``count`` panels, ``columns`` a row (width x height inches each); the grid's
    spare panels are hidden. Returns the figure and the ``count`` axes in reading order."""
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows + extra_height), squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.axis("off")
    return fig, list(axes.ravel()[:count])


def histogram_grid(out_dir: str, layers: dict[str, dict], page: int, names: list[str]) -> str:
    """Small multiples: each layer's expert shares, the uniform share dashed."""
    fig, axes = _small_multiples(len(names), GRID_COLUMNS, 14 / GRID_COLUMNS, 2.1, extra_height=0.8)
    for ax, name in zip(axes, names):
        share = _share(layers[name]["counts"])
        ax.stairs(share, np.arange(len(share) + 1) - 0.5, fill=True, color=BLUE)  # one artist, not E bars
        ax.axhline(1 / len(share), color=RED, linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {name}", fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.set_xlim(-0.5, len(share) - 0.5)
        expert_axis(ax.xaxis)
    fig.supxlabel("expert")
    fig.supylabel("share of the layer's assignments")
    fig.tight_layout()
    # above the panels, not over the first row's titles (the saved image grows to hold it)
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=BLUE), plt.Line2D([], [], color=RED, linestyle="--")],
               labels=["expert share", "uniform share"], loc="lower center", ncol=2, bbox_to_anchor=(0.5, 1.0))
    return save(fig, out_dir, f"expert_hist_grid{page}.png")


def expert_histogram(out_dir: str, layer: str, counts: list[int]) -> str:
    counts = np.asarray(counts)
    fig, ax = plt.subplots(figsize=(min(MAX_INCHES, max(6, len(counts) * 0.12)), 3.5))
    ax.bar(np.arange(len(counts)), counts, color=BLUE)
    ax.axhline(counts.sum() / len(counts), color=RED, linestyle="--", label="uniform share")
    ax.set_xlabel("expert")
    expert_axis(ax.xaxis)
    ax.set_ylabel("routed tokens (x top-k slots)")
    ax.set_title(f"layer {layer}: expert usage ({counts.sum()} assignments)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return save(fig, out_dir, f"expert_hist_layer{layer}.png")


def phase_histogram(out_dir: str, layer: str, prefill: list[int], decode: list[int]) -> str:
    prefill, decode = np.asarray(prefill, float), np.asarray(decode, float)
    x = np.arange(len(prefill))
    fig, ax = plt.subplots(figsize=(min(MAX_INCHES, max(6, len(x) * 0.15)), 3.5))
    for offset, values, label, color in ((-0.2, prefill, "prefill", GREEN), (0.2, decode, "decode", ORANGE)):
        ax.bar(x + offset, _share(values), width=0.4, label=f"{label} ({int(values.sum())})", color=color)
    ax.axhline(1 / len(x), color=RED, linestyle="--", label="uniform share")
    ax.set_xlabel("expert")
    expert_axis(ax.xaxis)
    ax.set_ylabel("share of the phase's assignments")
    ax.set_title(f"layer {layer}: prefill vs decode")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return save(fig, out_dir, f"expert_hist_layer{layer}_by_phase.png")


def latency(out_dir: str, requests: dict[str, dict]) -> Optional[str]:
    rows = [r for r in requests.values() if r["e2e_s"] is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, key, title in ((axes[0, 0], "ttft_s", "time to first token"), (axes[0, 1], "e2e_s", "end-to-end latency"),
                           (axes[1, 0], "tpot_s", "time per output token")):
        values = np.asarray([r[key] * 1000 for r in rows if r[key] is not None])
        ax.hist(values, bins=min(40, max(5, len(values) // 2)), color=BLUE)
        for p, style in ((50, "-"), (99, ":")):
            if len(values):
                ax.axvline(np.percentile(values, p), color=RED, linestyle=style, label=f"p{p}")
        ax.set_xlabel("ms")
        ax.set_ylabel("requests")
        ax.set_title(f"{title} ({len(values)} requests)")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax = axes[1, 1]
    points = [(r["hot_expert_share_mean"], r["e2e_s"] * 1000) for r in rows if r["hot_expert_share_mean"] is not None]
    if points:
        ax.scatter(*zip(*points), s=10, color=PURPLE, alpha=0.6)
    ax.set_xlabel("share of the request's tokens on its hottest expert\n(mean over layers)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("latency against hot-expert share")
    fig.tight_layout()
    return save(fig, out_dir, "latency.png")


def cooccurrence(out_dir: str, run: RunStats, layers: list[int]) -> Optional[str]:
    """Per layer, how often experts i and j serve the same token (share of its tokens)."""
    if not layers:
        return None
    fig, axes = _small_multiples(len(layers), min(3, len(layers)), 4.6, 4.2)
    for ax, layer in zip(axes, layers):
        ls = run.layers[layer]
        full = ls.cooccurrence + ls.cooccurrence.T
        share = full / max(ls.weighted_tokens, 1)
        np.fill_diagonal(share, np.nan)
        # square root colour scale: one hot expert would otherwise leave every other pair black
        image = ax.imshow(share, cmap="viridis", interpolation="nearest", norm=PowerNorm(0.5))
        ax.set_title(f"layer {layer}", fontsize="small")
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        expert_axis(ax.xaxis)
        expert_axis(ax.yaxis)
        fig.colorbar(image, ax=ax, shrink=0.8, label="share of tokens with both")
    fig.suptitle("expert co-occurrence: both experts chosen for the same token")
    fig.tight_layout()
    return save(fig, out_dir, "cooccurrence.png")


def position_expert(out_dir: str, run: RunStats, layers: list[int]) -> Optional[str]:
    """Expert share by token-position bucket, prefill and decode, for a few layers."""
    if not layers:
        return None
    labels = ["0", "1"] + [f"{1 << (b - 1)}-{(1 << b) - 1}" for b in range(2, POSITION_BUCKETS - 1)] + [f"{1 << (POSITION_BUCKETS - 2)}+"]
    fig, axes = plt.subplots(len(layers), 2, figsize=(13, 3.2 * len(layers) + 0.6), squeeze=False)
    for row, layer in zip(axes, layers):
        ls = run.layers[layer]
        for ax, phase, counts in zip(row, ("prefill", "decode"), ls.by_position):
            used = np.flatnonzero(counts.sum(axis=1))
            if not len(used):
                ax.set_title(f"layer {layer}, {phase}: no tokens", fontsize="small")
                ax.axis("off")
                continue
            rows_shown = np.arange(used.min(), used.max() + 1)
            share = counts[rows_shown] / np.maximum(counts[rows_shown].sum(axis=1, keepdims=True), 1)
            image = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(len(rows_shown)), [labels[b] for b in rows_shown], fontsize="x-small")
            ax.set_title(f"layer {layer}, {phase}", fontsize="small")
            ax.set_xlabel("expert")
            expert_axis(ax.xaxis)
            ax.set_ylabel("token position")
            fig.colorbar(image, ax=ax, label="share", shrink=0.8)
    fig.suptitle("expert share by token position (rows sum to 1)")
    fig.tight_layout()
    return save(fig, out_dir, "position_expert.png")


def router_confidence(out_dir: str, run: RunStats) -> Optional[str]:
    """Per layer the distribution of the top-1 weight and of the top-k weight sum."""
    names = [layer for layer in sorted(run.layers) if run.layers[layer].weighted_tokens]
    if not names:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, min(MAX_INCHES, max(3.5, len(names) * 0.16 + 1.8))))
    fewest = min(run.layers[layer].weighted_tokens for layer in names)
    for ax, attr, title in ((axes[0], "top1_hist", "top-1 weight"), (axes[1], "topk_sum_hist", "top-k weight sum")):
        hists = np.vstack([getattr(run.layers[layer], attr) for layer in names]).astype(float)
        used = np.flatnonzero(hists.sum(axis=0))
        last = max(int(used.max()) + 1, int(round(1 / WEIGHT_BIN)) + 1)
        merge = _bins_merged(last, fewest)
        last = -(-last // merge) * merge
        hists = np.pad(hists, ((0, 0), (0, max(0, last - hists.shape[1]))))[:, :last]
        hists = hists.reshape(len(names), last // merge, merge).sum(axis=2)
        shares = hists / np.maximum(hists.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(0, last * WEIGHT_BIN, len(names) - 0.5, -0.5))
        layer_ticks(ax, names)
        ax.set_xlabel(title)
        ax.set_ylabel("layer")
        ax.set_title(f"router confidence: {title}")
        fig.colorbar(image, ax=ax, label="share of the layer's tokens", shrink=0.5)
    fig.tight_layout()
    return save(fig, out_dir, "router_confidence.png")


def _bins_merged(bins: int, tokens: int) -> int:
    """How many 0.01-wide weight bins make one column: about sqrt(tokens) columns (at least
    10, at most 100), so a few hundred tokens draw a histogram, not a barcode."""
    columns = min(100, max(10, int(tokens ** 0.5)))
    return next((m for m in (1, 2, 4, 5, 10, 20, 25, 50) if bins / m <= columns), 50)


def profile(out_dir: str, joined: dict) -> Optional[str]:
    """MoE time per layer (from the profiler trace) beside the same steps' imbalance."""
    layers = joined["layers"]
    if not layers:
        return None
    names = list(layers)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(names))
    left.bar(x, [layers[n]["moe_us_mean"] for n in names], color=BLUE)
    layer_ticks(left, names, axis="x")
    left.set_xlabel("layer")
    left.set_ylabel("MoE time per step (µs)", color=BLUE)
    twin = left.twinx()
    imbalance = [layers[n]["imbalance_max_over_mean_mean"] for n in names]
    twin.plot(x, [np.nan if v is None else v for v in imbalance], "o-", color=RED)
    known = [v for v in imbalance if v is not None]
    twin.set_ylim(1.0, max(known + [1.0]) * 1.1)  # from 1 (balanced): a narrow range would magnify the spread
    twin.set_ylabel("max / mean expert load", color=RED)
    left.set_title(f"per layer, over {joined['steps_joined']} profiled steps")
    points = np.asarray(joined["points"], dtype=float).reshape(-1, 5)
    if len(points):
        # layers are categories: one colour each, a colour bar with whole layer numbers
        order = sorted({int(v) for v in points[:, 0]})
        index = np.searchsorted(order, points[:, 0])
        cmap = plt.get_cmap("tab10" if len(order) <= 10 else "viridis", len(order))
        norm = BoundaryNorm(np.arange(len(order) + 1) - 0.5, cmap.N)
        scatter = right.scatter(points[:, 3], points[:, 2] / points[:, 4], c=index, s=10, cmap=cmap, norm=norm)
        bar = fig.colorbar(scatter, ax=right, label="layer")
        every = max(1, -(-len(order) // MAX_TICKS))
        bar.set_ticks(range(0, len(order), every), labels=[str(order[i]) for i in range(0, len(order), every)])
    right.set_xlabel("max / mean expert load in the step")
    right.set_ylabel("MoE time per token (µs)")
    right.set_title("each (step, layer): time against imbalance")
    fig.tight_layout()
    return save(fig, out_dir, "profile_moe_time.png")

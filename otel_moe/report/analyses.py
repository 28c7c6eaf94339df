"""The sections of summary.json computed from one run's aggregates: per layer,
per request, latency percentiles, co-occurrence, position -> expert and router
confidence. Plain numbers only (None where there is nothing to say)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from otel_moe.report.aggregate import (
    POSITION_BUCKETS,
    WEIGHT_BIN,
    LayerStats,
    RequestStats,
    RunStats,
    entropy_bits,
    js_divergence_bits,
)

PERCENTILES = (50, 90, 99)
TOP_PAIRS = 10
SLOWEST = 10


def finite(value) -> Optional[float]:
    """summary.json is strict JSON: NaN and infinities become null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def layer_entry(ls: LayerStats) -> dict:
    counts = ls.counts
    mean = counts.mean() if len(counts) else 0
    return {
        "tokens": ls.tokens,
        "counts": counts.tolist(),
        "prefill_counts": ls.prefill.tolist(),
        "decode_counts": ls.decode.tolist(),
        "imbalance_max_over_mean": finite(counts.max() / mean) if mean else None,
        "imbalance_cv": finite(counts.std() / mean) if mean else None,
        "entropy_bits": entropy_bits(counts),
        "max_entropy_bits": float(np.log2(len(counts))) if len(counts) else 0.0,
        "step_max_over_mean_mean": finite(np.mean(ls.max_over_mean.y)) if ls.max_over_mean.y else None,
        "mean_top1_weight": finite(ls.top1_weight_sum / ls.weighted_tokens) if ls.weighted_tokens else None,
        "mean_topk_weight_sum": finite(ls.weight_sum / ls.weighted_tokens) if ls.weighted_tokens else None,
        "router_confidence": {"top1_weight": histogram_percentiles(ls.top1_hist),
                              "topk_weight_sum": histogram_percentiles(ls.topk_sum_hist)},
    }


def histogram_percentiles(hist: np.ndarray) -> Optional[dict]:
    """p10/p50/p90 of a weight histogram, each the lower edge of its 0.01-wide bin."""
    total = hist.sum()
    if not total:
        return None
    cumulative = np.cumsum(hist)
    return {f"p{p}": round(int(np.searchsorted(cumulative, total * p / 100)) * WEIGHT_BIN, 4) for p in (10, 50, 90)}


def tpot_s(r: RequestStats) -> Optional[float]:
    if r.e2e_s is None or r.ttft_s is None or not r.completion_tokens or r.completion_tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (r.completion_tokens - 1)


def requests_section(run: RunStats) -> dict[str, dict]:
    """Per request: tokens by phase, latency, and from its own routing the
    share of its tokens on its hottest expert in each layer and the spread
    (entropy) of its expert usage over all layers."""
    layers = sorted(run.routing.slots)
    out = {}
    for request_id, r in run.requests.items():
        hot: list[Optional[float]] = []
        spread = None
        if r.row is not None and r.row >= 0:
            by_layer = run.routing.of(r.row)
            for layer in layers:
                counts = by_layer[layer]
                total = counts.sum()
                hot.append(round(float(counts.max() / total), 4) if total else None)
            spread = entropy_bits(np.sum(list(by_layer.values()), axis=0)) if by_layer else None
        shares = [h for h in hot if h is not None]
        out[request_id] = {
            "tokens": r.tokens, "prefill_tokens": r.prefill, "decode_tokens": r.decode,
            "e2e_s": r.e2e_s, "ttft_s": r.ttft_s, "queue_s": r.queue_s, "tpot_s": finite(tpot_s(r)),
            "trace_id": r.trace_id or None,
            "expert_entropy_bits": spread,
            "hot_expert_share_mean": round(float(np.mean(shares)), 4) if shares else None,
            "hot_expert_share_by_layer": hot if shares else None,
        }
    return out


def latency_percentiles(requests: dict[str, dict]) -> dict:
    out = {}
    for key, name in (("ttft_s", "ttft_ms"), ("tpot_s", "tpot_ms"), ("e2e_s", "e2e_ms")):
        values = np.asarray([r[key] * 1000 for r in requests.values() if r[key] is not None])
        out[name] = {"count": len(values), **{f"p{p}": finite(np.percentile(values, p)) if len(values) else None
                                               for p in PERCENTILES}}
    return out


def slowest_requests(requests: dict[str, dict], layers: list[int]) -> list[dict]:
    """The SLOWEST requests by end-to-end latency, with their routing."""
    timed = sorted((r["e2e_s"], request_id) for request_id, r in requests.items() if r["e2e_s"] is not None)
    out = []
    for e2e, request_id in reversed(timed[-SLOWEST:]):
        r = requests[request_id]
        hot = r["hot_expert_share_by_layer"] or []
        hottest = max(((share, layer) for share, layer in zip(hot, layers) if share is not None), default=None)
        out.append({"request_id": request_id, "e2e_ms": e2e * 1000, "ttft_ms": _ms(r["ttft_s"]), "tpot_ms": _ms(r["tpot_s"]),
                    "tokens": r["tokens"], "prefill_tokens": r["prefill_tokens"], "decode_tokens": r["decode_tokens"],
                    "hot_expert_share_mean": r["hot_expert_share_mean"],
                    "most_concentrated_layer": hottest[1] if hottest else None,
                    "most_concentrated_share": hottest[0] if hottest else None,
                    "expert_entropy_bits": r["expert_entropy_bits"]})
    return out


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000


def cooccurrence_section(run: RunStats) -> dict:
    """Per layer the TOP_PAIRS expert pairs chosen together for one token; share = of the layer's tokens."""
    layers = {}
    for layer, ls in sorted(run.layers.items()):
        if ls.cooccurrence is None or not ls.cooccurrence.any():
            continue
        flat = ls.cooccurrence.ravel()
        top = np.argsort(flat)[::-1][:TOP_PAIRS]
        tokens = max(ls.weighted_tokens, 1)
        layers[str(layer)] = {"top_pairs": [{"experts": [int(i // ls.num_experts), int(i % ls.num_experts)],
                                             "tokens": int(flat[i]), "share": round(float(flat[i]) / tokens, 4)}
                                            for i in top if flat[i]]}
    return {"layers": layers}


def position_buckets() -> list[list[int]]:
    """[first, last] position of each bucket; the last bucket is open-ended (last = -1)."""
    out = [[0, 0]] + [[1 << (b - 1), (1 << b) - 1] for b in range(1, POSITION_BUCKETS)]
    out[-1][1] = -1
    return out


def position_section(run: RunStats) -> dict:
    """Per layer, phase and position bucket: tokens, the hottest expert and its
    share, and how far the bucket's expert distribution is from the layer's
    whole one (Jensen-Shannon divergence, bits)."""
    layers = {}
    for layer, ls in sorted(run.layers.items()):
        if not ls.by_position.any():
            continue
        entry = {}
        for phase_index, phase in enumerate(("prefill", "decode")):
            rows = []
            for bucket in range(POSITION_BUCKETS):
                counts = ls.by_position[phase_index, bucket]
                total = int(counts.sum())
                if total:
                    top = int(counts.argmax())
                    rows.append({"bucket": bucket, "assignments": total, "top_expert": top,
                                 "top_share": round(float(counts[top]) / total, 4),
                                 "js_divergence_bits": round(js_divergence_bits(counts, ls.counts), 4)})
            entry[phase] = rows
        layers[str(layer)] = entry
    return {"buckets": position_buckets(), "layers": layers}


def sampling_line(summary: dict) -> str:
    """What sampling left out of the traces, in one line (empty: nothing)."""
    if not summary.get("unsampled_tokens"):
        return ""
    return (f"{summary['unsampled_tokens']} tokens of unsampled requests (OTEL_TRACES_SAMPLER) are not in the traces: "
            f"the {len(summary['requests'])} requests here are the sampled ones; the metrics count every token")

"""report.html: one self-contained page over the PNGs (relative links), readable offline."""
from __future__ import annotations

import html


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _img(name: str, alt: str) -> str:
    return f'<figure><img src="{html.escape(name)}" alt="{html.escape(alt)}"><figcaption>{html.escape(name)}</figcaption></figure>'


def _profile_section(joined: dict, image) -> list[str]:
    note = (f"{joined['steps_joined']} of the {joined['steps_in_trace']} steps in the torch.profiler trace joined to "
            f"their routing records by step index; MoE time from {', '.join(joined['time_source'])}.")
    if joined["steps_with_other_token_count"]:
        note += f" <b>{joined['steps_with_other_token_count']} joined steps have another token count than their record.</b>"
    parts = ["<h2>Profiler: MoE time against load imbalance</h2>", f"<p class='note'>{note}</p>"]
    if image:
        parts.append(_img(image, "MoE time and imbalance per layer"))
    parts.append(_table(
        ["layer", "steps", "MoE time per step (µs)", "mean max/mean", "corr(time per token, max/mean)"],
        [[name, v["steps"], v["moe_us_mean"], v["imbalance_max_over_mean_mean"], v["time_per_token_imbalance_correlation"]]
         for name, v in joined["layers"].items()]))
    return parts


def render(summary: dict, images: dict) -> str:
    layers = summary["layers"]
    inputs = summary["inputs"]
    skipped = f", <b>{inputs['bad_lines']} corrupt or truncated lines skipped</b>" if inputs["bad_lines"] else ""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>otel-moe report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}figcaption{color:#777;font-size:small}"
        "table{border-collapse:collapse;font-size:small}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "p.note{color:#555}</style></head><body>",
        "<h1>MoE routing report</h1>",
        f"<p class='note'>{len(inputs['files'])} input files, {inputs['lines']} lines{skipped}; "
        f"{len(summary['runs'])} run(s), {len(summary['requests'])} requests. Only real tokens of real engine steps "
        "are counted: vLLM's profile and warm-up runs and CUDA-graph padding never reach these numbers. "
        "Each token counts once per expert it is routed to (top-k times).</p>",
        "<h2>Expert usage across layers</h2>",
        "<p class='note'>Share of each layer's assignments per expert. A balanced layer is one flat colour; "
        "bright cells are hot experts.</p>",
        _img(images["heatmap"], "layer by expert heatmap"),
        _table(["layer", "tokens", "max/mean", "CV", "entropy (bits)", "max possible", "mean top-1 weight", "mean top-k weight sum"],
               [[name, v["tokens"], v["imbalance_max_over_mean"], v["imbalance_cv"], v["entropy_bits"], v["max_entropy_bits"],
                 v["mean_top1_weight"], v["mean_topk_weight_sum"]] for name, v in layers.items()]),
        "<h2>Load imbalance over time</h2>",
        "<p class='note'>Per engine step and layer: the busiest expert's load over the mean load, and the coefficient "
        "of variation. Skew that grows over a run shows here first; long runs are averaged into at most 2048 points.</p>",
        _img(images["imbalance"], "load imbalance per step"),
    ]
    if images.get("latency"):
        parts += ["<h2>Request latency</h2>",
                  "<p class='note'>From vLLM's own <code>llm_request</code> spans, joined to routing by "
                  "<code>gen_ai.request.id</code>. Time per output token = (e2e - TTFT) / (output tokens - 1).</p>",
                  _img(images["latency"], "latency")]
    else:
        parts += ["<h2>Request latency</h2><p class='note'>No vLLM <code>llm_request</code> spans in the input: run vLLM "
                  "with <code>--otlp-traces-endpoint</code> (offline: <code>otlp_traces_endpoint=</code> and "
                  "<code>disable_log_stats=False</code>) pointed at the same collector.</p>"]
    if "profile" in summary:
        parts += _profile_section(summary["profile"], images.get("profile"))
    parts.append("<h2>Per layer</h2><p class='note'>Counts per expert with the uniform share dashed, then the same split "
                 "by phase: prefill (prompt tokens) against decode (generated tokens).</p>")
    for name in layers:
        parts.append(f"<h3>layer {html.escape(name)}</h3>")
        parts.append(_img(images["hist"][name], f"layer {name} histogram"))
        if name in images["phase"]:
            parts.append(_img(images["phase"][name], f"layer {name} by phase"))
    parts.append("<p class='note'>Numbers: summary.json beside this page.</p></body></html>")
    return "\n".join(parts)

"""report.html: one self-contained page over the PNGs (relative links), readable
offline: a table of contents, a section per topic, and a layer index that
jumps to each layer's histogram."""
from __future__ import annotations

import html
from typing import Optional

from otel_moe.report.analyses import sampling_line

STYLE = ("body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222;padding:0 1em}"
         "img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}figcaption{color:#777;font-size:small}"
         "table{border-collapse:collapse;font-size:small;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f4f4f4;position:sticky;top:0}"
         "p.note{color:#555}nav.toc{background:#f8f8f8;padding:.5em 1em;border:1px solid #ddd}"
         "nav.layers a{display:inline-block;min-width:2.2em;margin:1px;text-align:center;border:1px solid #ddd;"
         "text-decoration:none;font-size:small}div.scroll{max-height:420px;overflow:auto}")


def _table(headers: list[str], rows: list[list], scroll: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f"<div class='scroll'>{table}</div>" if scroll else table


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _img(name: Optional[str], alt: str) -> str:
    if name is None:  # drawn without figures (--no-figures)
        return ""
    return f'<figure><img src="{html.escape(name)}" alt="{html.escape(alt)}"><figcaption>{html.escape(name)}</figcaption></figure>'


def _note(text: str) -> str:
    return f"<p class='note'>{text}</p>"


def _page(title: str, body: list[str]) -> str:
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                      f"<style>{STYLE}</style></head><body>", *body, "</body></html>"])


def _overview(summary: dict) -> list[str]:
    inputs = summary["inputs"]
    skipped = f", <b>{inputs['bad_lines']} corrupt or truncated lines skipped</b>" if inputs["bad_lines"] else ""
    steps = {("tokens",): "engine steps", ("counts",): "windows of engine steps (counts mode)"}.get(
        tuple(summary.get("modes", ())), "engine steps and windows of steps (tokens and counts mode)")
    parts = [_note(f"Run <code>{html.escape(summary['run'])}</code>: {summary['steps']} {steps}, "
                   f"{len(summary['layers'])} MoE layers, {len(summary['requests'])} requests. Read from "
                   f"{len(inputs['files'])} input files, {inputs['lines']} lines{skipped}. Only real tokens of real engine "
                   "steps are counted: vLLM's profile and warm-up runs and CUDA-graph padding never reach these numbers. "
                   "Each token counts once per expert it is routed to (top-k times).")]
    if len(summary["runs_found"]) > 1:
        others = ", ".join(f"<code>{html.escape(r)}</code>" for r in summary["runs_found"] if r != summary["run"])
        parts.append(_note(f"<b>The input holds other runs too ({others}); they are reported apart, never pooled.</b>"))
    if sampling_line(summary):
        parts.append(_note(f"<b>{html.escape(sampling_line(summary))}.</b>"))
    if inputs["skipped_records"]:
        parts.append(_note("<b>Records skipped (each counted by reason, its neighbours kept):</b>"))
        parts.append(_table(["reason", "records"], [[k, v] for k, v in inputs["skipped_records"].items()]))
    return parts


def _layers_section(summary: dict, images: dict) -> list[str]:
    layers = summary["layers"]
    return [
        "<h2 id='usage'>Expert usage across layers</h2>",
        _note("Share of each layer's assignments per expert. A balanced layer is one flat colour; bright cells are hot experts."),
        _img(images.get("heatmap"), "layer by expert heatmap"),
        _table(["layer", "tokens", "max/mean", "CV", "entropy (bits)", "max possible", "mean top-1 weight", "mean top-k weight sum"],
               [[name, v["tokens"], v["imbalance_max_over_mean"], v["imbalance_cv"], v["entropy_bits"], v["max_entropy_bits"],
                 v["mean_top1_weight"], v["mean_topk_weight_sum"]] for name, v in layers.items()], scroll=True),
    ]


def _imbalance_section(images: dict) -> list[str]:
    parts = ["<h2 id='imbalance'>Load imbalance over time</h2>",
             _note("Per engine step (counts mode: per window of steps) and layer, the busiest expert's load over the mean "
                   "load. The grey bars above give each step's tokens: a small step is uneven by chance, not by skew. Long "
                   "runs are averaged into at most 512 columns.")]
    if images.get("imbalance_heatmap"):
        parts.append(_img(images["imbalance_heatmap"], "imbalance per layer and step"))
    parts.append(_img(images.get("imbalance"), "load imbalance per step"))
    return parts


def _histogram_section(summary: dict, images: dict) -> list[str]:
    layer_anchor = {name: f"layer-{name}" for name in summary["layers"]}
    nav = "".join(f"<a href='#{layer_anchor[n]}'>{html.escape(n)}</a>" for n in summary["layers"])
    parts = ["<h2 id='layers'>Per layer</h2>",
             _note("Each layer's expert shares, the uniform share dashed. Jump to a layer:"),
             f"<nav class='layers'>{nav}</nav>"]
    for image, names in images.get("grid_pages", []):
        parts.append("".join(f"<span id='{layer_anchor[n]}'></span>" for n in names))
        parts.append(_img(image, f"layers {names[0]}-{names[-1]}"))
    singles = [n for n in summary["layers"] if f"hist{n}" in images]
    if singles:
        parts.append(_note("Per-layer files: counts per expert, then the split by phase (prefill: prompt tokens, "
                           "decode: generated tokens)."))
        for name in singles:
            parts.append(f"<h3>layer {html.escape(name)}</h3>")
            parts.append(_img(images[f"hist{name}"], f"layer {name} histogram"))
            if images.get(f"phase{name}"):
                parts.append(_img(images[f"phase{name}"], f"layer {name} by phase"))
    return parts


def _requests_section(summary: dict, images: dict) -> list[str]:
    parts = ["<h2 id='requests'>Requests and latency</h2>"]
    latency = summary["latency"]
    if images.get("latency"):
        parts += [_note("From vLLM's own <code>llm_request</code> spans, joined to routing by <code>gen_ai.request.id</code>. "
                        "Time per output token = (e2e - TTFT) / (output tokens - 1). Hot-expert share: the share of a "
                        "request's tokens on its own busiest expert in a layer, averaged over layers."),
                  _table(["", "requests", "p50 (ms)", "p90 (ms)", "p99 (ms)"],
                         [[name[:-3].upper(), v["count"], v["p50"], v["p90"], v["p99"]] for name, v in latency.items()]),
                  _img(images["latency"], "latency")]
    else:
        parts.append(_note("No vLLM <code>llm_request</code> spans in the input: run vLLM with "
                           "<code>--otlp-traces-endpoint</code> (offline: <code>otlp_traces_endpoint=</code> and "
                           "<code>disable_log_stats=False</code>) pointed at the same collector."))
    slow = summary["slowest_requests"]
    if slow:
        parts += ["<h3>Slowest requests</h3>",
                  _table(["request", "e2e ms", "TTFT ms", "TPOT ms", "tokens", "prefill", "decode", "hot-expert share",
                          "most concentrated layer", "its share", "entropy (bits)"],
                         [[r["request_id"], r["e2e_ms"], r["ttft_ms"], r["tpot_ms"], r["tokens"], r["prefill_tokens"],
                           r["decode_tokens"], r["hot_expert_share_mean"], r["most_concentrated_layer"],
                           r["most_concentrated_share"], r["expert_entropy_bits"]] for r in slow])]
    without = summary["requests_without_routing_detail"]
    detail = f" {without} requests came past the memory bound for per-request routing and have no per-layer shares." if without else ""
    parts.append(_note(f"Every request, with its tokens by phase and per-layer hot-expert shares: "
                       f"<a href='requests.csv'>requests.csv</a> and summary.json.{detail}"))
    return parts


def _cooccurrence_section(summary: dict, images: dict) -> list[str]:
    parts = ["<h2 id='cooccurrence'>Expert co-occurrence</h2>"]
    if not images.get("cooccurrence"):
        return parts + [_note("Needs the tokens mode (expert ids per token), top-k >= 2 and at most 256 experts.")]
    layers = summary["cooccurrence"]["layers"]
    parts += [_note("How often two experts are chosen for the same token, as a share of the layer's tokens, for the "
                    "layers whose most frequent pair is the most frequent. Top pairs of every layer: summary.json."),
              _img(images["cooccurrence"], "expert co-occurrence"),
              _table(["layer", "top pairs (experts: share of tokens)"],
                     [[name, ", ".join(f"{p['experts'][0]}+{p['experts'][1]}: {p['share']:.3f}" for p in v["top_pairs"][:5])]
                      for name, v in layers.items()], scroll=True)]
    return parts


def _position_section(images: dict) -> list[str]:
    parts = ["<h2 id='position'>Token position and expert choice</h2>"]
    if not images.get("position"):
        return parts + [_note("Needs the tokens mode (positions per token).")]
    return parts + [_note("Expert share by the token's position in its request (buckets double in size), prompt tokens "
                          "(prefill) apart from generated ones (decode), for the layers whose choice depends most on "
                          "position (or those given with --layers). Per bucket the hottest expert and the distance from "
                          "the layer's overall distribution: summary.json <code>position_expert</code>."),
                    _img(images["position"], "expert share by position")]


def _confidence_section(summary: dict, images: dict) -> list[str]:
    parts = ["<h2 id='confidence'>Router confidence</h2>"]
    if not images.get("confidence"):
        return parts + [_note("Needs the tokens mode (router weights per token).")]
    rows = []
    for name, v in summary["layers"].items():
        top1, total = v["router_confidence"]["top1_weight"] or {}, v["router_confidence"]["topk_weight_sum"] or {}
        rows.append([name, *(top1.get(p) for p in ("p10", "p50", "p90")), *(total.get(p) for p in ("p10", "p50", "p90"))])
    return parts + [_note("Per layer, how sure the router is: the distribution of the top-1 weight and of the sum of the "
                          "top-k weights (weights as the model's router returns them)."),
                    _img(images["confidence"], "router confidence"),
                    _table(["layer", "top-1 p10", "top-1 p50", "top-1 p90", "top-k sum p10", "top-k sum p50",
                            "top-k sum p90"], rows, scroll=True)]


def _profile_section(joined: dict, image) -> list[str]:
    note = (f"{joined['steps_joined']} of the {joined['steps_in_trace']} steps in the torch.profiler trace joined to "
            f"their routing records by step index; MoE time from {', '.join(joined['time_source'])}.")
    if joined["steps_with_other_token_count"]:
        note += f" <b>{joined['steps_with_other_token_count']} joined steps have another token count than their record.</b>"
    parts = ["<h2 id='profile'>Profiler: MoE time against load imbalance</h2>", _note(note)]
    if image:
        parts.append(_img(image, "MoE time and imbalance per layer"))
    parts.append(_table(
        ["layer", "steps", "MoE time per step (µs)", "mean max/mean", "corr(time per token, max/mean)"],
        [[name, v["steps"], v["moe_us_mean"], v["imbalance_max_over_mean_mean"], v["time_per_token_imbalance_correlation"]]
         for name, v in joined["layers"].items()], scroll=True))
    return parts


SECTIONS = [("usage", "Expert usage across layers"), ("imbalance", "Load imbalance over time"), ("layers", "Per layer"),
            ("requests", "Requests and latency"), ("cooccurrence", "Expert co-occurrence"),
            ("position", "Token position and expert choice"), ("confidence", "Router confidence")]


def render(summary: dict, images: dict) -> str:
    sections = SECTIONS + ([("profile", "Profiler: MoE time against load imbalance")] if "profile" in summary else [])
    toc = "".join(f"<li><a href='#{key}'>{html.escape(title)}</a></li>" for key, title in sections)
    parts = ["<h1>MoE routing report</h1>", *_overview(summary), f"<nav class='toc'><b>Contents</b><ol>{toc}</ol></nav>",
             *_layers_section(summary, images), *_imbalance_section(images), *_histogram_section(summary, images),
             *_requests_section(summary, images), *_cooccurrence_section(summary, images), *_position_section(images),
             *_confidence_section(summary, images)]
    if "profile" in summary:
        parts += _profile_section(summary["profile"], images.get("profile"))
    parts.append(_note("Numbers: summary.json beside this page."))
    return _page("otel-moe report", parts)


def render_index(index: dict) -> str:
    """The page over several runs' reports."""
    rows = "".join(f"<tr><td><a href='{html.escape(r['folder'])}/report.html'>{html.escape(name)}</a></td>"
                   f"<td>{r['steps']}</td><td>{r['requests']}</td><td>{r['layers']}</td></tr>"
                   for name, r in index["runs"].items())
    return _page("otel-moe report: runs", [
        "<h1>MoE routing report: several runs</h1>",
        _note(f"The input holds {len(index['runs'])} runs (<code>otel_moe.run_id</code>); each is reported on its own, "
              "never pooled. <code>otel-moe compare</code> sets two side by side; <code>--run ID</code> reports one."),
        f"<table><thead><tr><th>run</th><th>steps</th><th>requests</th><th>layers</th></tr></thead><tbody>{rows}</tbody></table>"])

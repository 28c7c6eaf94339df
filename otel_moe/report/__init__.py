"""``otel-moe report``: routing (collector files, JSONL logs) -> histograms,
heatmap, imbalance over time, latency, summary.json and report.html."""

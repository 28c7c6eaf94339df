"""The exporter process of a recording vLLM worker (``otel-moe exporter``): it
receives the worker's messages (``process``), turns them into step records
(``records``) and writes them to the sinks (``sinks``: JSONL, OTLP traces and
metrics). The worker's end of the link is ``otel_moe.worker.link``."""

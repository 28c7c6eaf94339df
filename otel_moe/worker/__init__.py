"""What runs in vLLM's worker process, on its engine thread: the binding to vLLM
(the only module that knows vLLM's internals), the capture buffers the routers
write, the per-step recorder and snapshot, the profiler ranges, and the link
that starts the exporter process and hands it messages."""

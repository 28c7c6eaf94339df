"""vLLM's front end (the API server, or the process that calls ``LLM.generate``):
where a request gets its trace context."""

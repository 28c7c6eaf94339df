"""What the worker and its exporter process share: the ring of shared memory,
the messages on their socket, and the step layout. numpy only: the exporter
never loads torch or vLLM."""

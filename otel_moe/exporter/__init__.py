"""The exporter process of a recording vLLM worker.

``link`` runs in the worker (starts the process, hands it messages);
``process`` is the exporter itself (records, sinks, export).
"""

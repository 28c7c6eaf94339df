"""Expert load as OpenTelemetry metrics, from the exporter process (never vLLM's
engine thread). Records add into numpy totals; the SDK's reader thread reads
them at each export (``OTEL_METRIC_EXPORT_INTERVAL``), so a step costs a few
bincounts, not one ``add()`` per series.

- ``moe.expert.tokens`` (counter, ``{token}``): tokens routed to each expert,
  by ``moe.layer``, ``moe.expert``, ``moe.phase`` (``prefill`` / ``decode``;
  counts mode, whose windows carry no split: ``all``) and ``otel_moe.dp_rank``.
- ``moe.layer.imbalance`` (gauge, ``{ratio}``): busiest expert over mean expert
  load since the previous export, per ``moe.layer`` and ``otel_moe.dp_rank``.
- ``moe.layer.experts_unused`` (gauge, ``{expert}``): experts that got no token
  since the previous export, likewise.
- ``otel_moe.engine_thread.time`` (counter, ``s``) and ``otel_moe.recorded_steps``
  (counter, ``{step}``), by ``otel_moe.dp_rank``: what recording cost vLLM's engine
  thread, over how many steps (their rates' quotient is the cost per step).
``VLLM_LOG_MOE_METRICS=layers`` keeps only the gauges and the cost (few series);
``OTEL_METRICS_EXPORTER=none`` turns metrics off; ``prometheus`` serves them from this
process for a Prometheus scrape instead of pushing them over OTLP (``otlp,prometheus``: both),
on ``OTEL_EXPORTER_PROMETHEUS_HOST`` (``localhost``) and ``OTEL_EXPORTER_PROMETHEUS_PORT``
(9464) plus the worker's data-parallel rank: one port per recording worker.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import numpy as np

from otel_moe import schema
from otel_moe.exporter.records import StepRecord

logger = logging.getLogger("vllm.otel_moe")
PHASES = ("prefill", "decode", "all")


def _exporters(env=os.environ) -> set[str]:
    return {e.strip().lower() for e in env.get("OTEL_METRICS_EXPORTER", "otlp").split(",") if e.strip()} - {"none"}


def enabled(env=os.environ) -> bool:
    return bool(_exporters(env))


def _readers(dp_rank: int) -> list:
    """The SDK readers OTEL_METRICS_EXPORTER asks for: a periodic OTLP export, a Prometheus
    endpoint, or both. An endpoint that cannot listen is logged; the rest goes on."""
    readers = []
    exporters = _exporters()
    if "otlp" in exporters:
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(_exporter()))
    if "prometheus" in exporters:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST") or "localhost"
        port = int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT") or 9464) + dp_rank
        registry = CollectorRegistry()  # this process's metrics alone
        try:
            start_http_server(port, addr=host, registry=registry)
        except OSError as err:
            logger.error("otel-moe: cannot serve metrics for Prometheus on %s:%d (%s); they are not served",
                         host, port, err.strerror or err)
        else:
            readers.append(PrometheusMetricReader(registry=registry))
            logger.info("otel-moe: metrics for Prometheus on http://%s:%d/metrics", host, port)
    return readers


def _exporter():
    """From the standard variables; where only the traces' endpoint is given (as vLLM's
    --otlp-traces-endpoint does), the metrics go to the same collector."""
    env = os.environ
    protocol = (env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or "grpc").strip()
    endpoint = None
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if traces and not (env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        endpoint = traces if protocol == "grpc" else traces.rsplit("/v1/traces", 1)[0].rstrip("/") + "/v1/metrics"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter(endpoint=endpoint)  # None: endpoint, headers, timeout from the OTEL_* variables


class ExpertMetrics:
    def __init__(self, resource_attributes: dict, detail: str, reader=None) -> None:
        """``reader``: the SDK metric reader (default: what OTEL_METRICS_EXPORTER asks for)."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource

        self._lock = threading.Lock()
        self._totals: dict[tuple[int, str], np.ndarray] = {}  # (dp rank, phase) -> [layer slot, expert]
        self._seen: dict[str, np.ndarray] = {}  # gauge -> the all-ranks totals at its previous read
        self._layers: list[int] = []
        self._engine_thread = (0, 0)  # (ns, steps) so far, as the latest record says
        self._dp_rank = 0  # of this exporter's worker: gauges of several DP ranks stay apart
        run_id = resource_attributes.get("otel_moe.run_id", "")
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "vllm",
                                    "service.instance.id": str(run_id), **resource_attributes})
        readers = [reader] if reader else _readers(int(resource_attributes.get("vllm.data_parallel_rank") or 0))
        self._provider = MeterProvider(resource=resource, metric_readers=readers, views=_views())
        meter = self._provider.get_meter("otel_moe")
        if detail == "experts":
            meter.create_observable_counter(schema.METRIC_EXPERT_TOKENS, [self._observe_tokens], unit="{token}",
                                            description="tokens routed to each expert")
        meter.create_observable_gauge("moe.layer.imbalance", [self._observe_imbalance], unit="{ratio}",
                                      description="busiest expert's load over the mean, since the previous export")
        meter.create_observable_gauge("moe.layer.experts_unused", [self._observe_unused], unit="{expert}",
                                      description="experts that got no token since the previous export")
        meter.create_observable_counter(schema.METRIC_ENGINE_THREAD_TIME, [self._observe_engine_thread_time], unit="s",
                                        description="time recording took vLLM's engine thread")
        meter.create_observable_counter(schema.METRIC_RECORDED_STEPS, [self._observe_recorded_steps], unit="{step}",
                                        description="engine steps recorded (dropped ones included)")

    def add(self, record: StepRecord) -> None:
        steps = (record.last_step if record.is_window else record.step) + 1  # steps are numbered from 0, drops too
        self._engine_thread = max(self._engine_thread, (record.engine_thread_ns, steps))
        self._dp_rank = record.dp_rank
        if record.ids is not None:
            prefill = record.is_prefill()
            some = prefill.any()
            if some and prefill.all():
                self._add(record.dp_rank, "prefill", record.layers, record.num_experts, record.layer_counts())
            elif not some:  # a decode step: every row, without a copy of them
                self._add(record.dp_rank, "decode", record.layers, record.num_experts, record.layer_counts())
            else:
                for phase, rows in (("prefill", prefill), ("decode", ~prefill)):
                    self._add(record.dp_rank, phase, record.layers, record.num_experts, record.layer_counts(rows))
        elif record.counts is not None:
            self._add(record.dp_rank, "all", record.layers, record.counts.shape[1], record.counts.astype(np.int64))

    def _add(self, dp_rank: int, phase: str, layers: list[int], num_experts: int, counts: np.ndarray) -> None:
        with self._lock:
            self._dp_rank = dp_rank
            slots = [self._slot(layer) for layer in layers]
            have = self._totals.get((dp_rank, phase))
            if have is None or have.shape[0] < len(self._layers) or have.shape[1] < num_experts:
                have = self._totals[(dp_rank, phase)] = _grown(have, len(self._layers), num_experts)
            have[slots, :num_experts] += counts

    def _slot(self, layer: int) -> int:
        if layer not in self._layers:
            self._layers.append(layer)
        return self._layers.index(layer)

    def _observe_tokens(self, options):
        from opentelemetry.metrics import Observation

        with self._lock:
            out = []
            for (dp_rank, phase), counts in self._totals.items():
                for slot, layer in enumerate(self._layers[: counts.shape[0]]):
                    for expert in np.flatnonzero(counts[slot]):
                        out.append(Observation(int(counts[slot, expert]), {
                            "moe.layer": layer, "moe.expert": int(expert), "moe.phase": phase, "otel_moe.dp_rank": dp_rank}))
            return out

    def _observe_engine_thread_time(self, options):
        from opentelemetry.metrics import Observation

        return [Observation(self._engine_thread[0] / 1e9, {"otel_moe.dp_rank": self._dp_rank})]

    def _observe_recorded_steps(self, options):
        from opentelemetry.metrics import Observation

        return [Observation(self._engine_thread[1], {"otel_moe.dp_rank": self._dp_rank})]

    def _since_last_read(self, gauge: str) -> dict[int, tuple[float, int]]:
        """Per layer: (max / mean, experts unused) over what came since this gauge's
        previous read, all ranks and phases together (each gauge keeps its own mark)."""
        with self._lock:
            if not self._totals:
                return {}
            width = max(c.shape[1] for c in self._totals.values())
            total = np.zeros((len(self._layers), width), np.int64)
            for counts in self._totals.values():
                total[: counts.shape[0], : counts.shape[1]] += counts
            seen = _grown(self._seen.get(gauge), *total.shape)
            self._seen[gauge] = total
        delta = total - seen
        return {layer: (float(row.max() / row.mean()), int((row == 0).sum()))
                for layer, row in zip(self._layers, delta) if row.sum()}

    def _observe_imbalance(self, options):
        from opentelemetry.metrics import Observation

        return [Observation(ratio, {"moe.layer": layer, "otel_moe.dp_rank": self._dp_rank})
                for layer, (ratio, _) in self._since_last_read("imbalance").items()]

    def _observe_unused(self, options):
        from opentelemetry.metrics import Observation

        return [Observation(unused, {"moe.layer": layer, "otel_moe.dp_rank": self._dp_rank})
                for layer, (_, unused) in self._since_last_read("unused").items()]

    def close(self, timeout_s: float) -> None:
        self._provider.shutdown(timeout_millis=int(timeout_s * 1000))  # a last export


# Every (layer, expert, phase, DP rank) is a series of moe.expert.tokens: 58 layers x 256
# experts x 2 phases is ~30k. The SDK's default limit (2,000 a metric) would fold the rest
# into one `otel.metric.overflow` point, and with it every total past the first 2,000.
EXPERT_SERIES_LIMIT = 1 << 20


def _views() -> list:
    from opentelemetry.sdk.metrics.view import View

    try:
        return [View(instrument_name=schema.METRIC_EXPERT_TOKENS, aggregation_cardinality_limit=EXPERT_SERIES_LIMIT)]
    except TypeError:  # an SDK before per-view limits: its own (2,000 series) stays
        return []


def _grown(have: Optional[np.ndarray], layers: int, experts: int) -> np.ndarray:
    """``have`` (or nothing) padded with zeros to at least [layers, experts]."""
    if have is not None and have.shape[0] >= layers and have.shape[1] >= experts:
        return have
    grown = np.zeros((max(layers, 0 if have is None else have.shape[0]), max(experts, 0 if have is None else have.shape[1])),
                     np.int64)
    if have is not None:
        grown[: have.shape[0], : have.shape[1]] = have
    return grown


def open_metrics(resource_attributes: dict, detail: str) -> Optional[ExpertMetrics]:
    return ExpertMetrics(resource_attributes, detail) if enabled() else None

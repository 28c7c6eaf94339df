"""The latest value of every OTLP metric series, in Prometheus' text exposition
format, named as the OpenTelemetry Collector's ``prometheus`` exporter names
them: dots become underscores, a monotonic sum gets ``_total``, a unit gets a
suffix (``{...}`` annotations are dropped, ``1`` becomes ``_ratio``, ``s`` and
the other common UCUM units are spelled out: ``_seconds``), data
point attributes become labels, and ``job`` / ``instance`` come from the
resource (``service.name``, ``service.instance.id``). Cumulative sums are
taken as they come; delta sums are added up. Histograms are not exposed.
"""
from __future__ import annotations

import re
import threading

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

MAX_SERIES = 200_000  # past this, new series are dropped (and counted)
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
# The Collector's unit words (its Prometheus translator's unit map), for the units otel-moe might use.
_UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds", "By": "bytes",
               "KiBy": "kibibytes", "MiBy": "mebibytes", "%": "percent"}


def metric_name(name: str, unit: str, counter: bool) -> str:
    base = _INVALID.sub("_", name)
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()
    if unit == "1":
        base += "_ratio" if not counter else ""
    elif unit:
        base += "_" + _INVALID.sub("_", _UNIT_WORDS.get(unit, unit))
    return base + ("_total" if counter else "")


def label_name(key: str) -> str:
    name = _INVALID.sub("_", key)
    return "key_" + name if name[:1].isdigit() else name


def _value(any_value) -> str:
    kind = any_value.WhichOneof("value")
    return str(getattr(any_value, kind)) if kind else ""


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class PrometheusState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[tuple, float] = {}  # (name, labels) -> value
        self.dropped_series = 0

    def update(self, request: ExportMetricsServiceRequest) -> None:
        with self._lock:
            for resource_metrics in request.resource_metrics:
                resource = {kv.key: _value(kv.value) for kv in resource_metrics.resource.attributes}
                job = resource.get("service.name", "")
                if resource.get("service.namespace"):
                    job = f"{resource['service.namespace']}/{job}"
                base_labels = (("job", job), ("instance", resource.get("service.instance.id", "")))
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        self._metric(metric, base_labels)

    def _metric(self, metric, base_labels: tuple) -> None:
        kind = metric.WhichOneof("data")
        if kind == "sum":
            counter = metric.sum.is_monotonic
            points, delta = metric.sum.data_points, (
                metric.sum.aggregation_temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA)
        elif kind == "gauge":
            counter, points, delta = False, metric.gauge.data_points, False
        else:
            return  # histograms, summaries: not exposed here
        name = metric_name(metric.name, metric.unit, counter)
        self._kinds[name] = ("counter" if counter else "gauge", metric.description)
        for point in points:
            labels = base_labels + tuple(sorted((label_name(kv.key), _value(kv.value)) for kv in point.attributes))
            value = point.as_double if point.WhichOneof("value") == "as_double" else float(point.as_int)
            key = (name, labels)
            if key not in self._values and len(self._values) >= MAX_SERIES:
                self.dropped_series += 1
                continue
            self._values[key] = self._values.get(key, 0.0) + value if delta else value

    def render(self) -> bytes:
        with self._lock:
            by_name: dict[str, list] = {}
            for (name, labels), value in self._values.items():
                by_name.setdefault(name, []).append((labels, value))
            lines = []
            for name in sorted(by_name):
                kind, help_text = self._kinds[name]
                if help_text:
                    lines.append(f"# HELP {name} {_escape(help_text)}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in sorted(by_name[name]):
                    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels if v != "")
                    lines.append(f"{name}{{{text}}} {value:.17g}")
        return ("\n".join(lines) + "\n").encode()

"""An embedded OTLP traces collector: receivers (gRPC, HTTP) -> a file exporter
that writes what the OpenTelemetry Collector's ``file`` exporter writes."""

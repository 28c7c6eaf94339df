from otel_moe.config import ConfigError  # noqa: F401

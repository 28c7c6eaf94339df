"""``python -m otel_moe``: the ``otel-moe`` command line.

``python -m otel_moe exporter --spec JSON`` is the exporter process a
recording vLLM worker starts for itself (see otel_moe.exporter); it is
dispatched before the rest of the CLI is imported, so it starts quickly.
"""
import sys

if len(sys.argv) > 2 and sys.argv[1:3] == ["exporter", "--spec"] and len(sys.argv) == 4:
    from otel_moe.exporter.receiver import run

    sys.exit(run(sys.argv[3]))

from otel_moe.cli import main

sys.exit(main())

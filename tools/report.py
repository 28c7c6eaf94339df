"""Collected traces -> expert-usage histograms alongside request latency.

The same as `otel-moe report`; kept here as the script users run from a checkout:
    python tools/report.py out/demo/collected --out out/demo/report
"""
import sys

from otel_moe.report.main import main

if __name__ == "__main__":
    sys.exit(main())

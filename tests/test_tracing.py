"""Tracing off costs nothing per request: no SDK spans are built, and FastAPI's own telemetry stays off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import argparse, json
from fastapi import FastAPI
from fastserve import tracing
args = argparse.Namespace(otlp_endpoint="", trace_console={console})
span = tracing.setup_tracing("gateway", args).start_span("probe")
telemetry = getattr(FastAPI(), "_native_telemetry", None)  # FastAPI >= 0.16x traces HTTP requests itself
print(json.dumps({{"recording": span.is_recording(),
                   "fastapi_telemetry": telemetry.enabled() if telemetry else None}}))
"""


def probe(console: bool) -> dict:
    """In a fresh interpreter: OpenTelemetry's global provider can be set only once per process."""
    env_free = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(console=console)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env_free},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_exporter_means_no_recording_spans_and_no_fastapi_telemetry():
    off = probe(console=False)
    assert off["recording"] is False
    assert off["fastapi_telemetry"] in (False, None)


def test_an_exporter_records_spans():
    on = probe(console=True)
    assert on["recording"] is True
    assert on["fastapi_telemetry"] in (True, None)

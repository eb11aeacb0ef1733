"""OpenTelemetry set-up shared by the services.

Off by default: spans are exported only when an OTLP endpoint is given, by
`--otlp-endpoint` or the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variables
(the rest of the OTEL_EXPORTER_OTLP_* family applies as usual), or printed with
`--trace-console`. Context crosses the services as W3C `traceparent` in the
`trace_context` maps of the internal messages.
"""

from __future__ import annotations

import argparse
import logging
import os

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fastserve.flags import add_flag

log = logging.getLogger("fastserve.tracing")
_propagator = TraceContextTextMapPropagator()


def add_tracing_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--otlp-endpoint",
        default="",
        help="OTLP/gRPC collector for traces (else OTEL_EXPORTER_OTLP_ENDPOINT); empty = off",
    )
    add_flag(parser, "--trace-console", default=False, help="print finished spans to stdout")


def setup_tracing(service_name: str, args: argparse.Namespace) -> trace.Tracer:
    """The service's tracer. With no exporter configured it is OpenTelemetry's no-op tracer: an SDK
    provider without span processors would still build every span (attributes, events, links,
    context) only to drop it, and make FastAPI's built-in telemetry (FastAPI >= 0.16x traces every
    HTTP request once any SDK provider is set) add spans of its own to every request."""
    endpoint = (
        args.otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    )
    if not endpoint and not args.trace_console:
        return trace.get_tracer(f"fastserve.{service_name}")
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"fastserve-{service_name}")}
        )
    )
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = not endpoint.startswith("https://")
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure))
        )
        log.info("exporting traces over OTLP to %s", endpoint)
    if args.trace_console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    return trace.get_tracer(f"fastserve.{service_name}")


def inject(context: Context | None = None) -> dict[str, str]:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=context)
    return carrier


def extract(carrier) -> Context:
    return _propagator.extract(dict(carrier))


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()

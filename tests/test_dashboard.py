"""compose/grafana-dashboard.json and compose/prometheus.yml name metrics and ports that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = ("_bucket", "_total", "_sum", "_count")


def declared_metrics() -> set[str]:
    """Metric names as the metrics modules declare them (after the fastserve: prefix)."""
    names = set()
    for path in [*ROOT.glob("services/*/metrics.py"), ROOT / "fastserve/metrics.py"]:
        names |= set(re.findall(r'"([a-z0-9_]+)"', path.read_text()))
    return names


def test_every_dashboard_query_names_a_declared_metric():
    dashboard = json.loads((ROOT / "compose/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"fastserve:([a-z0-9_]+)", e)}
    declared = declared_metrics()
    for name in used:
        base = next((name.removesuffix(s) for s in SUFFIXES if name.endswith(s)), name)
        assert name in declared or base in declared, (
            f"the dashboard queries fastserve:{name}, which nothing serves"
        )
    assert len(dashboard["panels"]) >= 10


def test_prometheus_scrapes_every_service_on_its_compose_metrics_port():
    config = yaml.safe_load((ROOT / "compose/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    compose = yaml.safe_load((ROOT / "compose/docker-compose.yml").read_text())["services"]
    for target in targets:
        service, port = target.split(":")
        env = compose[service].get("environment", {})
        assert port in {str(v) for v in env.values()}, f"{service} does not serve metrics on {port}"

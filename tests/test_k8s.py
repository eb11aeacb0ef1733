"""The Kubernetes manifests (deploy/k8s) rendered and validated offline: no cluster, no API server.

Every rendered manifest of every overlay passes `kubernetes-validate` (the Kubernetes OpenAPI
schemas, strict: unknown fields are errors); the ServiceMonitor (a Prometheus Operator CRD, whose
schema kubernetes-validate does not carry) is checked against the Services it selects. The
FastServe containers' args parse with each service's own flag parser, and the shapes agree: one
pod per rank, the scheduler lists every rank, probes ask grpc health on the serving port, secrets
come from the Secret, GPUs are requested in the GPU overlay and not in the CPU one.
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path
from unittest import mock

import pytest

from tests.kustomize import render

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = {"gpu": ROOT / "deploy/k8s/overlays/gpu", "cpu": ROOT / "deploy/k8s/overlays/cpu"}
K8S_VERSION = "1.37.0"
SECRET = "fastserve-secrets"
FASTSERVE = ("gateway", "scheduler", "kvmanager", "worker")


def manifests(overlay: str) -> list[dict]:
    return render(OVERLAYS[overlay])


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(workload: dict) -> dict:
    [only] = workload["spec"]["template"]["spec"]["containers"]
    return only


def parse(c: dict):
    """The container's args through its service's parse_args, under its literal environment."""
    service = c["args"][0]
    module = importlib.import_module(f"fastserve.services.{service}.server")
    env = {e["name"]: e.get("value", "from-secret") for e in c.get("env", [])}
    env = {k: v.replace("$(REDIS_PASSWORD)", "from-secret") for k, v in env.items()}
    env = {k: ("0" if v == "from-secret" and k == "RANK" else v) for k, v in env.items()}
    with mock.patch.dict(os.environ, env):
        return module.parse_args(c["args"][1:])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_validates(overlay):
    docs = manifests(overlay)
    assert {d["kind"] for d in docs} >= {"Service", "StatefulSet", "Deployment", "ServiceMonitor"}
    validated = 0
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        validated += 1
    print(f"\n{overlay}: kubernetes-validate {K8S_VERSION} (strict) passed {validated} manifests", flush=True)


@pytest.mark.parametrize(
    "breakage",
    [
        ("replicas as a word", lambda d: d["spec"].__setitem__("replicas", "two")),
        ("an unknown field", lambda d: container(d).__setitem__("gpus", 1)),
        ("a probe without a port", lambda d: container(d)["readinessProbe"]["grpc"].pop("port")),
    ],
    ids=lambda b: b[0],
)
def test_validation_catches_a_broken_manifest(breakage):
    _, breaks = breakage
    worker = copy.deepcopy(by_kind(manifests("gpu"), "StatefulSet")["worker"])
    kubernetes_validate.validate(worker, K8S_VERSION, strict=True)
    breaks(worker)
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSION, strict=True)


def test_service_monitor_selects_every_metrics_port():
    docs = manifests("gpu")
    [monitor] = by_kind(docs, "ServiceMonitor").values()
    [endpoint] = monitor["spec"]["endpoints"]
    [expression] = monitor["spec"]["selector"]["matchExpressions"]
    selected = [
        s
        for s in by_kind(docs, "Service").values()
        if s["metadata"]["labels"].get(expression["key"]) in expression["values"]
    ]
    assert {s["metadata"]["name"] for s in selected} == set(FASTSERVE)
    for service in selected:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, service["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shapes_agree_with_the_services(overlay):
    docs = manifests(overlay)
    workloads = by_kind(docs, "StatefulSet") | by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    for name in FASTSERVE:
        c = container(workloads[name])
        assert c["args"][0] == name and c["image"].startswith("fastserve:"), name
        args = parse(c)
        assert args.host == "0.0.0.0", f"{name} must listen beyond loopback"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == args.port, name
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == args.port, f"{name}: {probe} on another port"
        env = {e["name"]: e for e in c["env"]}
        assert env["FASTSERVE_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": SECRET,
            "key": "internal-token",
        }
        if name == "gateway":  # as `fastserve up` and compose start it (docs/design.md, memory after a burst)
            assert env["PYTHONMALLOC"]["value"] == "malloc", overlay
        metrics = next(k for k in env if k.endswith("_METRICS_PORT"))
        assert int(env[metrics]["value"]) == ports["metrics"], name
        assert {p["targetPort"] for p in services[name]["spec"]["ports"]} <= set(ports), name
        gpus = c["resources"].get("requests", {}).get("nvidia.com/gpu")
        if name == "worker":
            assert gpus == (1 if overlay == "gpu" else None), f"{overlay}: worker GPU request {gpus}"
            assert args.device == ("cuda" if overlay == "gpu" else "cpu")
            group = workloads["worker"]
            assert group["spec"]["replicas"] == args.tp * args.pp == int(env["WORLD_SIZE"]["value"])
            assert group["spec"]["podManagementPolicy"] == "Parallel", "ranks must start together"
            assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"].endswith(
                "['apps.kubernetes.io/pod-index']"
            )
            assert env["MASTER_ADDR"]["value"] == "worker-0.worker"
        else:
            assert gpus is None, name
        if name in ("gateway", "scheduler"):
            assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": SECRET,
                "key": "redis-password",
            }
            assert env["FASTSERVE_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    scheduler = parse(container(workloads["scheduler"]))
    ranks = workloads["worker"]["spec"]["replicas"]
    assert scheduler.worker_addresses.split(",") == [f"worker-{i}.worker:50060" for i in range(ranks)]
    assert scheduler.kvmanager_address == "kvmanager:50053"
    assert parse(container(workloads["gateway"])).scheduler_address == "scheduler:50052"
    assert workloads["scheduler"]["spec"]["strategy"]["type"] == "Recreate", "never two schedulers"
    redis = workloads["redis"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "redis-data"
    assert "requirepass ${REDIS_PASSWORD}" in container(redis)["command"][2]
    assert all(d["metadata"]["namespace"] == f"fastserve{'' if overlay == 'gpu' else '-cpu'}" for d in docs)

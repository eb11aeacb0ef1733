"""Rules that keep the layout a house and not a heap (DESIGN §6), and fresh generated stubs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fastserve.protogen import ROOT, generate

SERVICES = ("gateway", "scheduler", "kvmanager", "worker")
HEAVY = ("torch", "numpy", "grpc", "redis", "google", "transformers", "fastserve")


def package_of(module: str) -> str:
    """The top folder a module name comes from: `fastserve.services.gateway.x` -> `services`."""
    parts = module.split(".")
    if parts[0] == "fastserve" and len(parts) > 1 and parts[1] in ("services", "bench"):
        return parts[1]
    return parts[0]


def service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if package_of(module) == "services" and len(parts) > 2 else None


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_a_service_never_imports_another_service():
    for service in SERVICES:
        for path in (ROOT / "services" / service).rglob("*.py"):
            for name in imports_of(path):
                other = name.split(".")[1] if name.startswith("services.") and "." in name else None
                assert other in (None, service), f"{path} imports {name}"


def test_shared_package_imports_no_service():
    for path in (ROOT / "fastserve").rglob("*.py"):
        assert not any(package_of(n) == "services" for n in imports_of(path)), path


def test_policy_and_core_packages_import_nothing_heavy():
    # the simulator drives them too: pure Python, no service machinery
    for package in ("policy", "core"):
        for path in (ROOT / "services" / "scheduler" / package).rglob("*.py"):
            heavy = [n for n in imports_of(path) if package_of(n) in HEAVY]
            assert not heavy, f"{path} imports {heavy}"


# the generator stamps its own version into the stubs; a newer grpcio-tools release on PyPI changes
# that line and nothing else, so it is not what "stale" means
GENERATOR_STAMP = re.compile(
    r"^(GRPC_GENERATED_VERSION = |# Protobuf Python Version: ).*$|^\s*\d+,\s*$", re.M
)


def without_generator_stamp(text: str) -> str:
    return GENERATOR_STAMP.sub("", text)


def test_committed_stubs_match_the_protos(tmp_path):
    for fresh in generate(tmp_path):
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python -m fastserve.protogen"
        assert without_generator_stamp(committed.read_text()) == without_generator_stamp(fresh.read_text()), (
            f"{committed} is stale: run python -m fastserve.protogen"
        )


def test_code_imports_services_and_bench_through_the_fastserve_namespace():
    # they install as fastserve.services / fastserve.bench (setup.py); a bare `services.x` works in a
    # checkout and breaks in the wheel
    for path in ROOT.glob("*/**/*.py"):
        if ".venv" in path.parts or path.is_relative_to(ROOT / "fastserve" / "v1"):
            continue
        bare = [n for n in imports_of(path) if n.split(".")[0] in ("services", "bench")]
        assert not bare, f"{path} imports {bare}: use fastserve.{bare[0]}"

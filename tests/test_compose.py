"""The docker-compose deployment (compose/) checked against the code, with no Docker engine.

The compose files are read the way `docker compose` reads them (YAML merge keys, then
${VAR} interpolation from compose/.env.example) and then:
- validate against the Compose Specification's JSON schema (compose/compose-spec.json);
- every FastServe service's command parses with that service's own `parse_args`, under
  the environment compose gives it, so every flag and every value exists in the CLI now;
- environment names map to flags (or are standard OpenTelemetry / NCCL / gloo names, or
  wait for the observability issue: PENDING);
- addresses, ports, ranks, GPUs, the Redis URL and the OTLP endpoint agree between services;
- the health probe is Python that imports and answers SERVING / NOT_SERVING for real;
- the Redis command refuses anonymous clients (run with a real redis-server);
- the collector config, the Dockerfile and docs/deploy.md match the compose files.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from fastserve.flags import env_name

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
FILES = ("docker-compose.yml", "docker-compose.multinode.yml", "docker-compose.cpu.yml")
# override files, each with the file it overrides (tests/test_compose_e2e.py runs them)
OVERRIDES = {"docker-compose.multinode.cpu.yml": "compose/docker-compose.multinode.yml"}
# the files without GPUs: workers on --device cpu (a gloo world), run for real by tests/test_compose_e2e.py
CPU_FILES = {"docker-compose.cpu.yml"}
SERVICES = ("gateway", "scheduler", "kvmanager", "worker")
DIST_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
# environment names the compose files set that no FastServe flag reads yet (none today)
PENDING: dict[str, set[str]] = {}
# read by NCCL, gloo and Python themselves
THIRD_PARTY_ENV = {
    "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME",
    "NCCL_DEBUG",
    "PYTHONUNBUFFERED",
    "PYTHONMALLOC",
}
OTLP_GRPC_PORT = 4317

# ------------------------------------------------------------------ reading the files as compose does

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def env_example() -> dict[str, str]:
    values = {}
    for line in (COMPOSE / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f".env.example: bad line {line!r}"
            values[name] = value
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR:+alt}, $VAR and $$."""

    def one(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        value, op, arg = env.get(name), m["op"], m["arg"]
        unset = value is None or (value == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset else value
        if op in (":?", "?"):
            assert not unset, f"${{{name}}} is required: {arg}"
            return value
        if op in (":+", "+"):
            return "" if unset else arg
        assert value is not None, f"${name} has no value in .env.example and no default"
        return value

    return _VAR.sub(one, text)


def interpolate_all(node, env: dict[str, str]):
    if isinstance(node, dict):
        return {key: interpolate_all(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_all(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


@functools.cache
def raw(name: str) -> dict:
    return yaml.safe_load((COMPOSE / name).read_text())


@functools.cache
def loaded(name: str) -> dict:
    return interpolate_all(raw(name), env_example())


def services_of(name: str) -> dict[str, dict]:
    return loaded(name)["services"]


def fastserve_services(name: str) -> dict[str, dict]:
    return {n: s for n, s in services_of(name).items() if s.get("command", [None])[0] in SERVICES}


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def profile(svc: dict) -> str:
    profiles = svc.get("profiles", [""])
    assert len(profiles) == 1, f"one profile (one node) per service, got {profiles}"
    return profiles[0]


def on_host_network(svc: dict) -> bool:
    return svc.get("network_mode") == "host"


def container_ports(svc: dict) -> set[int]:
    return {int(str(spec).rsplit(":", 1)[-1].split("/")[0]) for spec in svc.get("ports", [])}


# ------------------------------------------------------------------ the services' own parsers


@functools.cache
def parsed(file: str, name: str) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Parses the service's command with its module's parse_args, under its compose environment."""
    svc = services_of(file)[name]
    command = svc["command"]
    module = importlib.import_module(f"fastserve.services.{command[0]}.server")
    parsers: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        parsers.append(self)
        return original(self, args, namespace)

    stderr = io.StringIO()
    with (
        mock.patch.dict(os.environ),
        mock.patch.object(argparse.ArgumentParser, "parse_args", spy),
        contextlib.redirect_stderr(stderr),
    ):
        for key in [k for k in os.environ if k.startswith(("FASTSERVE_", "OTEL_")) or k in DIST_ENV]:
            del os.environ[key]
        os.environ.update(environment(svc))
        try:
            args = module.parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"{file}: {name}: `fastserve {shlex.join(command)}` is refused: {stderr.getvalue()}")
    return args, parsers[-1]


def env_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The environment variable each flag reads, as fastserve.flags.add_flag declares it in the help."""
    found = {}
    for action in parser._actions:
        declared = re.search(r"\[env (\w+);", action.help or "")
        if declared:
            found[declared[1]] = action
    return found


def address_of(name: str, svc: dict, args: argparse.Namespace) -> str:
    """Where peers reach a service: its compose name on the bridge, its --host on the host network."""
    return f"{args.host if on_host_network(svc) else name}:{args.port}"


def workers(file: str) -> list[tuple[str, dict, argparse.Namespace]]:
    found = [
        (n, s, parsed(file, n)[0]) for n, s in fastserve_services(file).items() if s["command"][0] == "worker"
    ]
    return sorted(found, key=lambda item: item[2].rank)


def the(file: str, service: str) -> tuple[str, dict, argparse.Namespace]:
    [(name, svc)] = [(n, s) for n, s in fastserve_services(file).items() if s["command"][0] == service]
    return name, svc, parsed(file, name)[0]


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("file", FILES)
def test_compose_file_validates_against_the_compose_spec(file):
    import jsonschema

    schema = json.loads((COMPOSE / "compose-spec.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator_class(schema).iter_errors(loaded(file))
    ]
    assert not errors, f"{file} breaks the compose spec:\n" + "\n".join(errors)


def test_variables_come_from_env_example():
    example = env_example()
    used: set[str] = set()
    for file in FILES:
        text = (COMPOSE / file).read_text()
        for m in _VAR.finditer(text):
            name = m["braced"] or m["bare"]
            if name:
                used.add(name)
                if m["op"] not in (":-", "-"):
                    assert name in example, f"{file} needs ${name}, which compose/.env.example does not set"
    assert not set(example) - used, f".env.example sets variables no compose file uses: {set(example) - used}"
    assert ".env" in (COMPOSE / ".gitignore").read_text().split(), (
        "compose/.env (passwords) must be git-ignored"
    )


@pytest.mark.parametrize("file", FILES)
def test_every_command_parses_with_the_service_cli(file):
    names = fastserve_services(file)
    assert {s["command"][0] for s in names.values()} == set(SERVICES), f"{file} lacks a FastServe service"
    for name, svc in names.items():
        build = svc["build"]
        assert (build["context"], build["dockerfile"]) == ("..", "compose/Dockerfile"), name
        assert build["args"]["DEVICE"] == ("cpu" if file in CPU_FILES else "cuda"), name
        args, _ = parsed(file, name)
        assert args.host != "127.0.0.1", (
            f"{name} listens on loopback only: peers in other containers cannot reach it"
        )


@pytest.mark.parametrize("file", FILES)
def test_environment_names_map_to_flags(file):
    import opentelemetry.sdk.environment_variables as otel_env

    for name, svc in fastserve_services(file).items():
        service = svc["command"][0]
        args, parser = parsed(file, name)
        flags = env_flags(parser)
        # every service has --log-level under add_flag's default name: the help is read right
        assert env_name("--log-level") in flags, f"{name}: cannot read the flags' environment names"
        for key, value in environment(svc).items():
            if key in flags:
                action = flags[key]
                assert not set(action.option_strings) & set(svc["command"]), (
                    f"{name}: {key} and {action.option_strings[0]} both set: the flag silently wins"
                )
                if action.choices:
                    assert value in action.choices, f"{name}: {key}={value!r} not in {action.choices}"
            elif key.startswith("OTEL_"):
                assert hasattr(otel_env, key), f"{name}: {key} is not an OpenTelemetry SDK variable"
            else:
                assert key in THIRD_PARTY_ENV | PENDING.get(service, set()), (
                    f"{file}: {name} sets {key}, which no flag of `fastserve {service}` reads"
                )
                if key in PENDING.get(service, set()):
                    assert not hasattr(args, "metrics_port"), (
                        f"`fastserve {service} --metrics-port` has landed, but not as {key}: rename it in {file}"
                    )


@pytest.mark.parametrize("file", FILES)
def test_the_gateway_runs_under_glibc_malloc_as_fastserve_up_starts_it(file):
    """Its RSS comes back after a flash crowd only under glibc's allocator (docs/design.md)."""
    from fastserve.launcher import parse_args

    gateways = [svc for svc in fastserve_services(file).values() if svc["command"][0] == "gateway"]
    assert gateways, f"{file}: no gateway"
    expected = parse_args([]).gateway_pythonmalloc
    assert expected == "malloc"
    assert all(environment(svc).get("PYTHONMALLOC") == expected for svc in gateways), file


@pytest.mark.parametrize("file", FILES)
def test_addresses_ports_and_ranks_agree(file):
    example = env_example()
    services = services_of(file)
    ranks = workers(file)
    first = ranks[0][2]
    assert [a.rank for _, _, a in ranks] == list(range(first.world_size)), "one worker service per rank"
    nodes: dict[str, list[str]] = {}
    for name, svc, args in ranks:
        for key in ("world_size", "tp", "pp", "master_addr", "master_port", "model", "device"):
            assert getattr(args, key) == getattr(first, key), f"{name}: --{key} differs from rank 0"
        assert args.master_addr == address_of(*ranks[0]).rsplit(":", 1)[0], "MASTER_ADDR is not rank 0"
        if file in CPU_FILES:
            assert args.device == "cpu" and "deploy" not in svc, f"{name}: a CPU rank reserves no GPU"
            # memlock needs CAP_SYS_RESOURCE ("error setting rlimit type 8"): GPU files only
            assert "ulimits" not in svc, f"{name}: no ulimits on CPU (pinned memory is a GPU matter)"
            assert metrics_port(svc, args, file) == 9103 + args.rank, f"{name}: worker metrics port"
            continue
        assert args.device == "cuda" and args.local_rank == 0, f"{name}: one GPU, seen as cuda:0"
        [device] = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert len(device["device_ids"]) == 1, f"{name}: one GPU per rank"
        nodes.setdefault(profile(svc), []).append(device["device_ids"][0])
        assert svc.get("shm_size") or svc.get("ipc") == "host", f"{name}: NCCL needs shared memory"
        assert svc["ulimits"]["memlock"] == -1, f"{name}: pinned host KV blocks need memlock"
        assert metrics_port(svc, args, file) == 9103 + args.rank, (
            f"{name}: worker metrics port is 9103 + rank"
        )
    for node, gpus in nodes.items():
        assert len(gpus) == len(set(gpus)), f"two ranks share a GPU on node {node or 'single'}: {gpus}"
    # tensor parallelism stays inside a node: every TP group (one PP stage) on one node
    for stage in range(first.pp):
        group = [svc for _, svc, a in ranks if a.rank // first.tp == stage]
        assert len({profile(s) for s in group}) == 1, f"stage {stage}'s TP group spans nodes"

    kv_name, kv_svc, kv = the(file, "kvmanager")
    sched_name, sched_svc, sched = the(file, "scheduler")
    gw_name, gw_svc, gw = the(file, "gateway")
    assert sched.worker_addresses.split(",") == [address_of(n, s, a) for n, s, a in ranks]
    assert sched.kvmanager_address == address_of(kv_name, kv_svc, kv)
    assert gw.scheduler_address == address_of(sched_name, sched_svc, sched)
    assert gw.port in container_ports(gw_svc), "the gateway's port is not published"
    assert (
        metrics_port(gw_svc, gw, file),
        metrics_port(sched_svc, sched, file),
        metrics_port(kv_svc, kv, file),
    ) == (
        9100,
        9101,
        9102,
    )

    for args in (sched, gw):
        url = urlsplit(args.redis_url)
        assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379), args.redis_url
        assert url.password == example["REDIS_PASSWORD"] and not url.username, (
            "Redis URL without the password"
        )
    redis_script = " ".join(services["redis"]["command"])
    assert "requirepass ${REDIS_PASSWORD}" in redis_script and "--protected-mode yes" in redis_script
    assert "ports" not in services["redis"], "Redis is for the services only, not published"

    collector = services["otel-collector"]
    for name, svc in fastserve_services(file).items():
        endpoint = urlsplit(environment(svc)["OTEL_EXPORTER_OTLP_ENDPOINT"])
        if file in CPU_FILES:
            # the collector and Jaeger are images from a registry: behind a profile, tracing off by default
            assert not endpoint.geturl() and profile(collector) == "tracing", name
        elif on_host_network(svc):
            assert endpoint.port == OTLP_GRPC_PORT, name
            published = {p.rsplit(":", 1)[0] for p in collector["ports"]}
            assert f"{endpoint.hostname}:{OTLP_GRPC_PORT}" in published, (
                f"{name}: collector not published there"
            )
        else:
            assert (endpoint.hostname, endpoint.port) == ("otel-collector", OTLP_GRPC_PORT), name

        # health checks ask the service's own port over grpc.health.v1
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and test[3] == health_probe(file), name
        args = parsed(file, name)[0]
        host = args.host if on_host_network(svc) else "127.0.0.1"
        assert test[4] == f"{host}:{args.port}", f"{name}: health check on another port"
        # dependencies: in the same node, and healthy before dependents start
        for dep, how in svc.get("depends_on", {}).items():
            assert dep in services and profile(services[dep]) == profile(svc), f"{name} -> {dep}"
            wanted = "service_healthy" if "healthcheck" in services[dep] else "service_started"
            assert how["condition"] == wanted, f"{name} -> {dep}: {how}"
    same_node = {n for n, s, _ in ranks if profile(s) == profile(sched_svc)}
    assert set(sched_svc["depends_on"]) == {"redis", kv_name} | same_node
    assert set(gw_svc["depends_on"]) == {"redis", sched_name}


def metrics_port(svc: dict, args: argparse.Namespace, file: str) -> int:
    """--metrics-port where the service has it, else the pending variable; published unless on the host
    network (the CPU files publish only the public ports: the gateway's HTTP port serves /metrics too)."""
    pending = PENDING.get(svc["command"][0], set()) & set(environment(svc))
    port = args.metrics_port if hasattr(args, "metrics_port") else int(environment(svc)[pending.pop()])
    published = on_host_network(svc) or port in container_ports(svc)
    assert published != (file in CPU_FILES), f"{file}: metrics port {port} published: {published}"
    return port


def health_probe(file: str) -> str:
    probes = {svc["healthcheck"]["test"][3] for svc in fastserve_services(file).values()}
    assert len(probes) == 1, f"{file}: the services use different health probes"
    return probes.pop()


def test_health_probe_is_python_that_answers_serving():
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from fastserve.procs import free_port

    probe = health_probe(FILES[0])
    assert all(health_probe(f) == probe for f in FILES)
    compile(probe, "<healthcheck>", "exec")
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:

        def run(address: str) -> int:
            return subprocess.run([sys.executable, "-c", probe, address], timeout=30).returncode

        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run(f"127.0.0.1:{port}") == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run(f"127.0.0.1:{port}") == 0
        assert run(f"127.0.0.1:{free_port()}") == 1
    finally:
        server.stop(0)


def test_redis_command_refuses_anonymous_clients(tmp_path):
    import redis

    from fastserve.embedded_redis import redis_server_binary
    from fastserve.procs import free_port

    real_server = redis_server_binary()
    real_cli = Path(real_server).with_name("redis-cli")
    port, password = free_port(), env_example()["REDIS_PASSWORD"]
    # the compose command as is; redis-server and redis-cli on PATH point this test's port and dir
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, line in (
        (
            "redis-server",
            f'exec {shlex.quote(real_server)} "$@" --port {port} --dir {shlex.quote(str(tmp_path))}',
        ),
        ("redis-cli", f'exec {shlex.quote(str(real_cli))} -p {port} "$@"'),
    ):
        (shims / name).write_text(f"#!/bin/sh\n{line}\n")
        (shims / name).chmod(stat.S_IRWXU)
    svc = services_of(FILES[0])["redis"]
    env = {**os.environ, **environment(svc), "PATH": f"{shims}:{os.environ['PATH']}"}
    proc = subprocess.Popen(svc["command"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:  # wait for the port (redis-py would retry with backoff)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
                time.sleep(0.05)
        authed = redis.Redis(port=port, password=password)
        assert authed.ping()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as anonymous:
            anonymous.sendall(b"PING\r\n")
            assert anonymous.recv(256).startswith(b"-NOAUTH"), "Redis answers clients without the password"
        assert authed.config_get("protected-mode") == {"protected-mode": "yes"}
        check = svc["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL"
        if real_cli.exists():
            assert subprocess.run(["sh", "-c", check[1]], env=env).returncode == 0
            wrong = {**env, "REDIS_PASSWORD": "wrong"}
            assert (
                subprocess.run(["sh", "-c", check[1]], env=wrong, stderr=subprocess.DEVNULL).returncode != 0
            )
    finally:
        proc.terminate()
        proc.wait(10)


def test_otel_collector_config_feeds_jaeger():
    config = yaml.safe_load((COMPOSE / "otel-collector.yaml").read_text())
    grpc_endpoint = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc_endpoint == f"0.0.0.0:{OTLP_GRPC_PORT}", "the receiver must listen beyond loopback"
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"pipeline uses undefined {kind[:-1]} {component}"
    assert set(config["service"].get("extensions", [])) <= set(config.get("extensions", {}))
    exporters = [config["exporters"][e] for e in config["service"]["pipelines"]["traces"]["exporters"]]
    jaeger_host = urlsplit("//" + exporters[0]["endpoint"]).hostname
    for file in FILES:
        services = services_of(file)
        assert jaeger_host in services and services[jaeger_host]["image"].startswith(
            "jaegertracing/all-in-one"
        )
        assert environment(services[jaeger_host])["COLLECTOR_OTLP_ENABLED"] == "true"
        collector = services["otel-collector"]
        [mount] = collector["volumes"]
        source, target, *_ = mount.split(":")
        assert (COMPOSE / source).resolve() == COMPOSE / "otel-collector.yaml"
        assert collector["command"] == [f"--config={target}"]


def test_dockerfile_builds_anywhere():
    """Plain Dockerfile syntax (no BuildKit frontend pulled from a registry, no RUN --mount), the base
    image a build arg, CPU by default and CUDA by build args, and a small build context."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = (COMPOSE / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax=", text, re.M | re.I), "a syntax line makes BuildKit pull its frontend"
    assert not re.search(r"^RUN --mount", text, re.M), "RUN --mount needs BuildKit"
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim", text, re.M), "the default base: official Python"
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS runtime$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r'pip install .*"torch==\$\{TORCH_VERSION\}"', text)
    assert 'ENTRYPOINT ["fastserve"]' in text
    # python (the health probe) is the virtual environment's, where fastserve is installed
    venv = re.search(r"VIRTUAL_ENV=(\S+)", text)[1]
    assert f"PATH={venv}/bin:" in text and f"COPY --from=deps {venv} {venv}" in text
    for file in FILES:
        for name, svc in fastserve_services(file).items():
            args = svc["build"]["args"]
            if file not in CPU_FILES:
                assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and "-runtime-" in args["BASE_IMAGE"], (
                    name
                )
                assert args["TORCH_INDEX_URL"] == "", f"{name}: PyPI's default torch wheel is the CUDA build"
    # the build context (.dockerignore at the root: the classic builder reads no other) holds what
    # `pip install .` packages and compose/wheels/, nothing else
    assert not (COMPOSE / "Dockerfile.dockerignore").exists(), "the classic builder ignores it"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    kept = {line[1:] for line in (ROOT / ".dockerignore").read_text().split() if line[0] == "!"}
    packages = {"fastserve", "services", "bench"}  # the folders setup.py installs (as fastserve.*)
    assert packages | {"pyproject.toml", "setup.py", project["project"]["readme"], "compose/wheels"} == kept
    assert "COPY compose/wheels/ /wheels/" in text and (COMPOSE / "wheels" / ".gitignore").exists()


def test_deploy_doc_matches_the_compose_files():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    ignored = (COMPOSE / ".gitignore").read_text().splitlines()
    operator_files = {
        line.rstrip("/") for line in ignored if line and not line.startswith("#")
    }  # compose/.env
    for path in set(re.findall(r"\bcompose/[\w./-]*\w", doc)):
        assert (ROOT / path).exists() or path[len("compose/") :] in operator_files, (
            f"docs/deploy.md mentions {path}, which does not exist"
        )
    for name in env_example():
        assert name in doc, f"docs/deploy.md does not explain {name}"
    for file in FILES:
        for name in services_of(file):
            assert f"`{name}`" in doc, f"docs/deploy.md does not mention service `{name}` of {file}"
    commands = [
        line
        for block in re.findall(r"```\w*\n(.*?)```", doc, re.S)
        for line in block.replace("\\\n", " ").splitlines()
    ]
    compose_commands = [line for line in commands if line.strip().startswith("docker compose")]
    assert compose_commands, "docs/deploy.md has no docker compose command"
    for line in compose_commands:
        check_compose_command(shlex.split(line, comments=True))


GLOBAL_OPTIONS = {"-f", "--file", "--profile", "--env-file", "-p", "--project-name", "--project-directory"}
COMMAND_OPTIONS = {"--tail", "-u", "--user", "-w", "--workdir", "-e", "--env", "--index", "-t", "--timeout"}
COMMAND_OPTIONS |= {"--scale", "--wait-timeout", "--since", "--until"}
TAKES_SERVICES = {
    "up",
    "logs",
    "ps",
    "restart",
    "stop",
    "start",
    "build",
    "pull",
    "exec",
    "run",
    "kill",
    "top",
}


def check_compose_command(words: list[str]) -> None:
    """`docker compose -f FILE [--profile P] COMMAND [SERVICE...]`: the file, profiles and services exist."""
    files, profiles, positionals = [], [], []
    words = words[2:]
    while words:
        word = words.pop(0)
        if word in ("|", "&&", ";"):
            break
        option, _, inline = word.partition("=")
        if option in (COMMAND_OPTIONS if positionals else GLOBAL_OPTIONS):
            value = inline or words.pop(0)
            files += [value] if option in ("-f", "--file") else []
            profiles += [value] if option == "--profile" else []
        elif not word.startswith("-"):
            positionals.append(word)
            if positionals[0] in ("exec", "run") and len(positionals) == 2:
                break  # the rest is the command run inside the service
    if positionals == ["version"]:
        return
    assert files, f"`docker compose {' '.join(positionals)}`: name the file with -f compose/..."
    services: dict[str, dict] = {}
    for file in files:
        name = file[len("compose/") :]
        assert file.startswith("compose/") and (name in FILES or OVERRIDES.get(name) in files), (
            f"unknown compose file {file} (or an override without its base)"
        )
        if name in FILES:
            services |= services_of(name)
    known_profiles = {p for svc in services.values() for p in svc.get("profiles", [])}
    assert set(profiles) <= known_profiles, f"unknown profile in {profiles}"
    if positionals and positionals[0] in TAKES_SERVICES:
        for name in positionals[1:]:
            assert name in services, (
                f"docs/deploy.md: `docker compose {positionals[0]} {name}`: no such service"
            )
            assert not profiles or set(services[name].get("profiles", [])) & set(profiles), (
                f"{name} is not in profile {profiles}"
            )


def test_cpu_override_changes_only_what_gpus_need():
    """docker-compose.multinode.cpu.yml: the two-node walk-through with only the device changed."""

    class Tagged(yaml.SafeLoader):
        pass

    def tagged(loader, tag, node):
        if isinstance(node, yaml.MappingNode):
            return ("!" + tag, loader.construct_mapping(node, deep=True))
        return ("!" + tag, loader.construct_sequence(node, deep=True))

    Tagged.add_multi_constructor("!", tagged)
    override = yaml.load((COMPOSE / "docker-compose.multinode.cpu.yml").read_text(), Loader=Tagged)
    base = services_of("docker-compose.multinode.yml")
    for name, changes in override["services"].items():
        assert name in base, name
        if base[name].get("command", [None])[0] == "worker":
            assert changes == {"deploy": ("!reset", {}), "ulimits": ("!reset", {})}, name
            assert "${DEVICE:-cuda}" in raw("docker-compose.multinode.yml")["services"][name]["command"]
        elif name in ("jaeger", "otel-collector"):
            assert changes == {"profiles": ("!override", ["tracing"])}, name
        else:
            assert changes == {"depends_on": ("!reset", {})} and set(base[name]["depends_on"]) == {
                "otel-collector"
            }

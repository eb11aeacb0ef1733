"""`fastserve up` as a user runs it: a real subprocess tree, used through server reflection only."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from fastserve.procs import free_port
from fastserve.rpc import check_serving_sync
from tests.conftest import alive

ROOT = Path(__file__).resolve().parents[1]


def reflect_and_generate(address: str, prompt: str, max_tokens: int) -> list:
    """A client that knows nothing of our stubs: it learns the API from the server."""
    with grpc.insecure_channel(address) as chan:
        database = ProtoReflectionDescriptorDatabase(chan)
        assert "fastserve.v1.Gateway" in database.get_services()
        pool = DescriptorPool(database)
        method = pool.FindServiceByName("fastserve.v1.Gateway").FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls()
        request.prompt = prompt
        request.sampling.max_tokens = max_tokens
        request.sampling.temperature = 0.0
        request.sampling.ignore_eos = True
        call = chan.unary_stream(
            "/fastserve.v1.Gateway/Generate",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        return list(call(request, timeout=120))


def describe_v1(address: str, symbol: str) -> list[str]:
    """What `grpcurl describe SYMBOL` asks first: grpc.reflection.v1, file_containing_symbol.
    Returns the names of the files sent back (v1 and v1alpha messages are the same on the wire)."""
    with grpc.insecure_channel(address) as chan:
        call = chan.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (reply,) = list(
            call(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]), timeout=10)
        )
    assert not reply.HasField("error_response"), f"{symbol}: {reply.error_response.error_message}"
    names = []
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        names.append(proto.name)
    return names


def readme_commands() -> list[str]:
    """The shell commands and the Python snippet of the README's "Try it" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Try it") :]
    section = section[: section.index("\n## ", 1)]
    commands = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S):
        if lang == "python":
            commands.append(f".venv/bin/python - <<'EOF'\n{body}EOF")
        else:
            commands += [c for c in body.replace("\\\n", " ").splitlines() if c.strip()]
    return commands


def run_readme_commands(grpc_address: str, http_port: int) -> None:
    """Each as written, on this test's ports instead of the defaults."""
    commands = readme_commands()
    assert len(commands) >= 7
    for command in commands:
        command = command.replace("127.0.0.1:50051", grpc_address).replace(
            "127.0.0.1:8000", f"127.0.0.1:{http_port}"
        )
        env = {**os.environ, "FASTSERVE_ADDRESS": grpc_address}  # `fastserve generate`'s default address
        done = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        ok = done.returncode == 0 and done.stdout.strip() and '"error"' not in done.stdout
        assert ok, f"README: {command}\n{done.stdout}\n{done.stderr}"


def test_up_serves_reflection_client_and_sigterm_leaves_no_child():
    port, http_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastserve.cli",
            "up",
            "--port",
            str(port),
            "--http-port",
            str(http_port),
            "--host",
            "127.0.0.1",
            "--demo",
            "false",
            "--log-level",
            "WARNING",
        ],
        env=env,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not check_serving_sync(address):
            assert up.poll() is None, f"fastserve up exited with {up.returncode}"
            assert time.monotonic() < deadline, "gateway never became SERVING"
            time.sleep(0.5)
        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        for part in (
            "redis-server",
            "fastserve.services.kvmanager",
            "fastserve.services.worker",
            "fastserve.services.scheduler",
            "fastserve.services.gateway",
        ):
            assert part in names, f"{part} is not running under fastserve up"

        # grpcurl describe of methods, by v1 reflection and by a v1alpha client's descriptor pool
        assert "fastserve/v1/gateway.proto" in describe_v1(address, "fastserve.v1.Gateway.Generate")
        assert "grpc_health/v1/health.proto" in describe_v1(address, "grpc.health.v1.Health.Check")
        with grpc.insecure_channel(address) as chan:
            pool = DescriptorPool(ProtoReflectionDescriptorDatabase(chan))
            assert (
                pool.FindMethodByName("fastserve.v1.Gateway.Generate").output_type.name == "GenerateResponse"
            )

        run_readme_commands(address, http_port)

        messages = reflect_and_generate(address, "Hello, FastServe", max_tokens=8)
        final = messages[-1]
        assert final.finish_reason == 2  # FINISH_REASON_LENGTH
        assert len(messages) - 1 >= 2, f"only {len(messages) - 1} messages before the final one"
        assert sum(len(m.token_ids) for m in messages) == 8
        assert final.usage.completion_tokens == 8
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    deadline = time.monotonic() + 10  # `up` waited for each; a zombie's reaping may lag a moment
    while any(alive(c.pid) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [c.pid for c in children if alive(c.pid)]
    assert survivors == [], f"children still running after SIGTERM: {survivors}"


def test_up_repeats_a_childs_fatal_reason_as_its_last_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 100}')
    cmd = [sys.executable, "-m", "fastserve.cli", "up", "--model", str(tmp_path), "--demo", "false"]
    cmd += ["--port", str(free_port()), "--http-port", "0", "--start-timeout", "120"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("2") and "worker0" in last and "before it was SERVING" in last
    assert last.endswith("model_type 'gpt2' is not 'opt'"), last

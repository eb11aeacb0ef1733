"""`fastserve up` as a user runs it: a real subprocess tree, used through server reflection only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import psutil
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from fastserve.procs import free_port
from fastserve.rpc import check_serving_sync
from tests.conftest import alive


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


def test_up_serves_reflection_client_and_sigterm_leaves_no_child():
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastserve.cli",
            "up",
            "--port",
            str(port),
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
            "services.kvmanager",
            "services.worker",
            "services.scheduler",
            "services.gateway",
        ):
            assert part in names, f"{part} is not running under fastserve up"

        messages = reflect_and_generate(address, "Hello, FastServe", max_tokens=8)
        final = messages[-1]
        assert final.finish_reason == 2  # FINISH_REASON_LENGTH
        assert len(messages) - 1 >= 2, f"only {len(messages) - 1} messages before the final one"
        assert sum(len(m.token_ids) for m in messages) == 8
        assert final.usage.completion_tokens == 8
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    time.sleep(0.5)
    survivors = [c.pid for c in children if alive(c.pid)]
    assert survivors == [], f"children still running after SIGTERM: {survivors}"

"""The public ports with --api-key and TLS (a self-signed certificate made here): HTTPS and gRPC+TLS."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time

import grpc
import httpx2 as httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastserve.rpc import check_serving_sync
from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import start_stack
from tests.records import settled_info
from tests.reference import greedy

KEY = "sk-test-one"


def self_signed(directory) -> tuple[str, str, bytes]:
    """(certfile, keyfile, certificate PEM) for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(pem)
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(certfile), str(keyfile), pem


@pytest.fixture(scope="module")
def secure_stack(redis_url, tmp_path_factory):
    certfile, keyfile, pem = self_signed(tmp_path_factory.mktemp("tls"))
    stack = start_stack(
        redis_url,
        "--api-key",
        f"{KEY},sk-test-two",
        "--ssl-certfile",
        certfile,
        "--ssl-keyfile",
        keyfile,
        "--num-gpu-blocks",
        "64",
    )
    yield stack, certfile, pem
    stack.stop()


def secure_channel(stack, pem: bytes) -> grpc.Channel:
    return grpc.secure_channel(stack.addresses["gateway"], grpc.ssl_channel_credentials(pem))


def test_http_needs_a_key_and_streams_over_https(secure_stack):
    stack, certfile, _ = secure_stack
    base = stack.addresses["http"]
    assert base.startswith("https://")
    trust = ssl.create_default_context(cafile=certfile)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = httpx.get(f"{base}/v1/models", headers=headers, verify=trust)
        assert reply.status_code == 401 and "API key" in reply.json()["error"]["message"]
    assert httpx.get(f"{base}/health", verify=trust).status_code == 200  # health stays open
    api = openai.OpenAI(
        base_url=f"{base}/v1", api_key=KEY, max_retries=0, http_client=httpx.Client(verify=trust)
    )
    assert api.models.list().data[0].id == "opt-tiny"
    chunks = list(
        api.completions.create(
            model="opt-tiny", prompt=[2, 50, 51], max_tokens=5, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) >= 2


def test_grpc_needs_a_key_over_tls_and_health_stays_open(secure_stack):
    stack, _, pem = secure_stack
    chan = secure_channel(stack, pem)
    health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = gateway_pb2_grpc.GatewayStub(chan)
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(greedy([2, 5, 6], 3), metadata=metadata, timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    replies = list(
        stub.Generate(
            greedy([2, 5, 6], 4, request_id="owned-by-one"),
            metadata=(("authorization", f"Bearer {KEY}"),),
            timeout=60,
        )
    )
    assert sum(len(r.token_ids) for r in replies) == 4 and len(replies) >= 2

    # a request's record answers only to the key that made it
    mine = (("authorization", f"Bearer {KEY}"),)
    other = (("authorization", "Bearer sk-test-two"),)
    ask = gateway_pb2.GetRequestRequest(request_id="owned-by-one")
    assert settled_info(stub, "owned-by-one", mine).generated_tokens == 4
    with pytest.raises(grpc.RpcError) as info:
        stub.GetRequest(ask, metadata=other, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    cancel = gateway_pb2.CancelRequest(request_id="owned-by-one")
    assert not stub.Cancel(cancel, metadata=other, timeout=10).cancelled


def test_owners_and_n_requests_answer_from_redis_after_a_gateway_restart(secure_stack):
    """The owner is in each request's Redis record, so a restarted gateway (which remembers
    nothing) still answers the key that made a request, and only that key; a request with n > 1
    answers under the id the client knows, as a whole."""
    stack, _, pem = secure_stack
    mine, other = (("authorization", f"Bearer {KEY}"),), (("authorization", "Bearer sk-test-two"),)
    stub = gateway_pb2_grpc.GatewayStub(secure_channel(stack, pem))
    list(stub.Generate(greedy([2, 5, 7], 3, request_id="owned-single"), metadata=mine, timeout=60))
    sampling = common_pb2.SamplingParams(n=3, seed=4, temperature=1.0, max_tokens=4, ignore_eos=True)
    several = gateway_pb2.GenerateRequest(
        request_id="owned-n3", prompt_token_ids=[2, 8, 9], sampling=sampling
    )
    list(stub.Generate(several, metadata=mine, timeout=60))
    assert settled_info(stub, "owned-n3", mine).state == "finished"

    gateway = stack.child("gateway").proc
    stack.supervise_in_background()  # restarts what dies, as `fastserve up` does
    gateway.kill()
    deadline = time.monotonic() + 120
    while not check_serving_sync(stack.addresses["gateway"], root_cert=pem):
        assert time.monotonic() < deadline, "the gateway did not come back"
        time.sleep(0.2)
    assert stack.child("gateway").proc.pid != gateway.pid
    stub = gateway_pb2_grpc.GatewayStub(secure_channel(stack, pem))

    single = settled_info(stub, "owned-single", mine)
    assert (single.state, single.generated_tokens, single.n) == ("finished", 3, 0)
    whole = settled_info(stub, "owned-n3", mine)
    assert (whole.state, whole.n, whole.prompt_tokens, whole.generated_tokens) == ("finished", 3, 3, 12)
    assert [c.request_id for c in whole.completions] == ["owned-n3-0", "owned-n3-1", "owned-n3-2"]
    assert [c.generated_tokens for c in whole.completions] == [4, 4, 4]
    assert whole.finish_reason == "length,length,length"
    assert whole.finish_time >= max(c.finish_time for c in whole.completions) > 0
    for request_id in ("owned-single", "owned-n3", "owned-n3-1"):
        with pytest.raises(grpc.RpcError) as info:
            stub.GetRequest(gateway_pb2.GetRequestRequest(request_id=request_id), metadata=other, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and request_id in info.value.details()
        cancel = gateway_pb2.CancelRequest(request_id=request_id)
        assert not stub.Cancel(cancel, metadata=other, timeout=10).cancelled
    with pytest.raises(grpc.RpcError) as info:
        stub.GetRequest(gateway_pb2.GetRequestRequest(request_id="owned-n3"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

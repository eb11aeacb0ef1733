"""Every internal port closed to strangers: a `-tp 2 -pp 2` stack of `fastserve up` listens on
loopback only (the torch.distributed rendezvous included), and each process holds only the secrets
it uses: the API keys reach the gateway alone, the Redis URL (its password) the scheduler and the
gateway.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import psutil
import pytest

from tests.conftest import start_stack

API_KEY = "sk-test-only-the-gateway-knows-this"


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket of `pid` and its descendants."""
    out = []
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            out += [
                (c.laddr.ip, c.laddr.port)
                for c in proc.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.NoSuchProcess:
            pass
    return out


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too


def environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


@pytest.mark.timeout(600)
def test_a_tp2_pp2_stack_listens_on_loopback_only_and_keeps_secrets_where_used(
    tiny_checkpoint, monkeypatch, tmp_path
):
    monkeypatch.setenv("FASTSERVE_API_KEY", API_KEY)  # as a user passes it: in `up`'s environment
    stack = start_stack(
        "",  # the embedded Redis, with its password
        *("--data-dir", str(tmp_path)),
        *(
            "--model",
            tiny_checkpoint,
            "--tp",
            "2",
            "--pp",
            "2",
            "--num-gpu-blocks",
            "64",
            "--num-threads",
            "1",
        ),
    )
    try:
        procs = dict(stack.procs)
        assert sorted(procs) == [
            "gateway",
            "kvmanager",
            "redis",
            "scheduler",
            "worker0",
            "worker1",
            "worker2",
            "worker3",
        ]
        sockets = {name: listening(proc.pid) for name, proc in procs.items()}
        assert all(sockets[f"worker{r}"] for r in range(4))
        exposed = {name: [s for s in found if not loopback(s[0])] for name, found in sockets.items()}
        assert exposed == dict.fromkeys(procs, []), exposed
        password = stack.addresses["redis"].split("@")[0].rsplit(":", 1)[-1].encode()
        assert len(password) > 8
        for name, proc in procs.items():
            env = environ(proc.pid)
            assert (API_KEY.encode() in env) == (name == "gateway"), name
            assert (password in env) == (name in ("gateway", "scheduler")), name
            assert (stack.token.encode() in env) == (name != "redis"), name
        rendezvous = sorted({port for _, port in sockets["worker0"]})
        print(
            f"\n-tp 2 -pp 2: {sum(map(len, sockets.values()))} listening sockets, all on loopback "
            f"(worker0's, rendezvous included: {rendezvous}); API key only in the gateway's environment",
            flush=True,
        )
    finally:
        stack.stop()

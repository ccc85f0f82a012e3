"""A real `redis-server` on a loopback port, for tests: started, killed and restarted on the same port.

    with redis_server(tmp_path) as rds:
        rds.client().ping()

Outside CI a missing binary skips the test; in CI (CI set) it fails it (`.ci/run` installs redis-server).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.deploy.dashboard_queries import require_binary
from tests.integration.server_proc import free_port


class RedisProc:
    """`tls`: (certificate, key, CA) files; the server then listens with TLS only (no client certificates)."""

    def __init__(
        self, workdir: Path, password: str | None = None, tls: tuple[Path, Path, Path] | None = None
    ) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        if self.tls is None:
            return redis.Redis("127.0.0.1", self.port, password=self.password, socket_timeout=5)
        ca = str(self.tls[2])
        return redis.Redis(
            port=self.port, password=self.password, socket_timeout=5, ssl=True, ssl_ca_certs=ca
        )

    def start(self) -> None:
        port = ["--port", str(self.port)]
        if self.tls is not None:
            cert, key, ca = (str(p) for p in self.tls)
            port = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                cert,
                "--tls-key-file",
                key,
            ]
            port += ["--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
        args = [self.binary, *port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--protected-mode", "no"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()[-2000:]}")
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            time.sleep(0.05)
        raise TimeoutError("redis-server did not answer PING")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def memory_used_by(self, pattern: str) -> int:
        """Bytes Redis reports (`MEMORY USAGE`) for every key matching `pattern`."""
        client = self.client()
        return sum(int(client.memory_usage(k, samples=0) or 0) for k in client.scan_iter(match=pattern))


def self_signed(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it (openssl): (certificate, key, CA certificate)."""
    ca_key, ca, key, csr, cert = (workdir / n for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt"))
    ext = workdir / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=tssc-test-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return cert, key, ca


@contextlib.contextmanager
def redis_server(
    workdir: Path, password: str | None = None, tls: tuple[Path, Path, Path] | None = None
) -> Iterator[RedisProc]:
    proc = RedisProc(workdir, password, tls)
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()

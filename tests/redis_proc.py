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
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
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


@contextlib.contextmanager
def redis_server(workdir: Path, password: str | None = None) -> Iterator[RedisProc]:
    proc = RedisProc(workdir, password)
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()

"""The deployed router, deploy/nginx/tssc.conf, run by a real nginx on loopback, for tests.

`loopback_config` rewrites only the file's upstream `server` lines (to 127.0.0.1 ports) and its
`listen` line (to a 127.0.0.1 port), then wraps it in a minimal main configuration that keeps the pid
file, logs and temp files in one work directory, so nginx runs unprivileged:

    config = loopback_config(listen_port, [replica_a.port, replica_b.port], tmp_path)
    subprocess.run(nginx_command(config, "-t"), check=True)        # the configuration test
    with serving(config, listen_port) as router:                    # a running router
        httpx.post(router + "/v1/chat/completions", headers={"X-Session-ID": "s1"}, json=...)

The access log (`access.log` in the work directory) names the replica that served each request.
`parse` reads a configuration into directives, for checks that need no nginx binary.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.integration.server_proc import REPO_ROOT, stop_process, wait_until_ok

ROUTER_CONF = REPO_ROOT / "deploy" / "nginx" / "tssc.conf"
UPSTREAM = "tssc"

_BLOCK = re.compile(r"^upstream (?P<name>\w+) \{\n(?P<body>.*?)^\}", re.MULTILINE | re.DOTALL)
_SERVER = re.compile(r"^    server [\w.-]+:\d+(?P<params>[^;\n]*);\n", re.MULTILINE)
_LISTEN = re.compile(r"^    listen \d+;$", re.MULTILINE)
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
_TOKEN = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|#[^\n]*|[{};]|[^\s{};\"'#]+")


@dataclass(frozen=True)
class Directive:
    """One nginx directive: `name args...;`, or `name args... { block }`."""

    name: str
    args: tuple[str, ...]
    block: tuple[Directive, ...] = ()

    def all(self, name: str) -> list[Directive]:
        return [d for d in self.block if d.name == name]

    def one(self, name: str, *args: str) -> Directive:
        """The one directive `name` in this block whose arguments start with `args`."""
        (found,) = [d for d in self.all(name) if d.args[: len(args)] == args]
        return found


def router_conf() -> Directive:
    """deploy/nginx/tssc.conf, parsed."""
    return parse(ROUTER_CONF.read_text())


def seconds(value: str) -> int:
    """An nginx time ("600s", "10m", "30")."""
    number, unit = re.fullmatch(r"(\d+)([sm]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * (60 if unit == "m" else 1)


def size_bytes(value: str) -> int:
    """An nginx size ("8m" is 8 MiB)."""
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", value.lower()).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** " kmg".index(unit or " ")


def parse(text: str) -> Directive:
    """A configuration as the block of a root directive (quotes removed, comments dropped)."""
    stack: list[list[Directive]] = [[]]
    heads: list[list[str]] = []
    words: list[str] = []
    for match in _TOKEN.finditer(text):
        token = match[0]
        if token.startswith("#"):
            continue
        if token[0] in "\"'":
            words.append(token[1:-1])
        elif token == ";":
            stack[-1].append(Directive(words[0], tuple(words[1:])))
            words = []
        elif token == "{":
            heads.append(words)
            stack.append([])
            words = []
        elif token == "}":
            head, block = heads.pop(), tuple(stack.pop())
            stack[-1].append(Directive(head[0], tuple(head[1:]), block))
        else:
            words.append(token)
    assert not words and not heads, "unbalanced configuration"
    return Directive("", (), tuple(stack[0]))


def nginx_binary() -> str | None:
    """nginx on PATH or where Debian installs it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def loopback_config(listen_port: int, upstream_ports: Sequence[int], workdir: Path) -> Path:
    """Write the router on loopback into `workdir` and return its main configuration file."""
    assert upstream_ports, "the upstream needs at least one server"
    workdir.mkdir(parents=True, exist_ok=True)
    router = _rewrite_listen(_rewrite_upstream(ROUTER_CONF.read_text(), upstream_ports), listen_port)
    (workdir / "tssc.conf").write_text(router)
    main = workdir / "nginx.conf"
    main.write_text(_main_config(workdir))
    return main


def nginx_command(config: Path, *args: str) -> list[str]:
    """argv running nginx on `config` (from `loopback_config`) in the foreground; `-t` tests it."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (Debian package: nginx)")
    workdir = config.parent
    return [binary, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log"), *args]


@contextlib.contextmanager
def serving(config: Path, listen_port: int, timeout: float = 15.0) -> Iterator[str]:
    """Run nginx on `config` until the block exits; yields the router's base URL once it answers."""
    log = config.parent / "nginx.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(nginx_command(config), stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{listen_port}"
    try:
        wait_until_ok(proc, base_url + "/nginx-health", config.parent / "error.log", timeout)
        yield base_url
    finally:
        stop_process(proc)


def _rewrite_upstream(text: str, ports: Sequence[int]) -> str:
    """The `upstream tssc` block's server lines replaced by one per port (parameters kept)."""
    (block,) = [b for b in _BLOCK.finditer(text) if b["name"] == UPSTREAM]
    servers = list(_SERVER.finditer(block["body"]))
    assert servers, f"no `    server NAME:PORT ...;` line in upstream {UPSTREAM}"
    params = servers[0]["params"]
    lines = "".join(f"    server 127.0.0.1:{port}{params};\n" for port in ports)
    body = _SERVER.sub("", block["body"])
    body = body[: servers[0].start()] + lines + body[servers[0].start() :]
    return text[: block.start("body")] + body + text[block.end("body") :]


def _rewrite_listen(text: str, port: int) -> str:
    rewritten, count = _LISTEN.subn(f"    listen 127.0.0.1:{port};", text)
    assert count == 1, f"expected one `    listen PORT;` line, found {count}"
    return rewritten


def _main_config(workdir: Path) -> str:
    """nginx.conf around the router: everything nginx writes stays in `workdir`."""
    temp_paths = "".join(f"    {name}_temp_path {workdir / name};\n" for name in _TEMP_PATHS)
    # As root, nginx would run its workers as `nobody`, who cannot enter a private temp directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\ndaemon off;\npid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'error.log'} notice;\n"
        "events {\n    worker_connections 256;\n}\n"
        "http {\n"
        "    log_format upstreams '$request_id $status $request_method $request_uri "
        'upstream=$upstream_addr upstream_status=$upstream_status session="$http_x_session_id"\';\n'
        f"    access_log {workdir / 'access.log'} upstreams;\n"
        f"{temp_paths}"
        f"    include {workdir / 'tssc.conf'};\n"
        "}\n"
    )

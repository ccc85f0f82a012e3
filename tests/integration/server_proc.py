"""Start a real `tssc` server (uvicorn, subprocess) on a free loopback port, for tests and benches.

    with start_server(["--model", str(model_dir), "--no-cache"]) as srv:
        httpx.get(srv.base_url + "/health")

Also builds the seeded tiny model every integration test serves (`make_tiny_model`), and tiny hybrids
(`make_tiny_hybrid`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_VOCAB = 320


@dataclass(frozen=True)
class ServerProc:
    base_url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def char_tokenizer() -> Any:
    """A character-level tokenizer (printable ASCII, no merges) with the chat special tokens.

    Every token is one character, so any generated text re-tokenizes to exactly the generated
    tokens: what lets a follow-up turn resume from the previous turn's finish checkpoint even
    though a random tiny model writes gibberish."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    from server.train.tokenizer import SPECIAL_TOKENS

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def make_tiny_model(directory: Path, seed: int = 0, d_model: int = 32, n_layer: int = 2) -> Path:
    """A seeded tiny Mamba2 (transformers layout) plus the character tokenizer and chat template."""
    from server.train.tokenizer import save_tokenizer
    from tests.tiny_models import hf_model

    model = hf_model("mamba2", seed=seed, vocab=TINY_VOCAB, d_model=d_model, n_layer=n_layer, chunk_size=8)
    model.save_pretrained(directory)
    save_tokenizer(char_tokenizer(), directory)
    return directory


def make_tiny_hybrid(directory: Path, variant: str = "bamba", seed: int = 0) -> Path:
    """A seeded tiny hybrid Mamba2 + attention model of `variant` (`tests.tiny_hybrids`, transformers
    layout, vocab 320) plus the character tokenizer and chat template."""
    from server.train.tokenizer import save_tokenizer
    from tests.tiny_hybrids import tiny_hybrid

    tiny_hybrid(variant, seed=seed, vocab_size=TINY_VOCAB).save_pretrained(directory, safe_serialization=True)
    save_tokenizer(char_tokenizer(), directory)
    return directory


def wait_until_ok(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail early (with the log's tail) if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s:\n{_tail(log_path)}")


def _tail(log_path: Path, n: int = 40) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-n:])


def child_pids(pid: int, marker: str = "") -> list[int]:
    """The live child processes of `pid` whose command line contains `marker` (from /proc: no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
    return found


def engine_core_pid(server: subprocess.Popen[bytes]) -> int:
    """The engine core process of a `--engine-process` server (the child multiprocessing spawned)."""
    (pid,) = child_pids(server.pid, "spawn_main")
    return pid


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def start_server(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    timeout: float = 120.0,
) -> Iterator[ServerProc]:
    """Run `python -m server.serve --host 127.0.0.1 --port <free> ARGS` until the block exits."""
    port = free_port()
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    log_path = log_dir / f"tssc-server-{port}.log"
    cmd = [sys.executable, "-m", "server.serve", "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    srv = ServerProc(base_url=f"http://127.0.0.1:{port}", port=port, proc=proc, log_path=log_path)
    try:
        wait_until_ok(proc, srv.base_url + "/health", log_path, timeout)
        yield srv
    finally:
        stop_process(proc)

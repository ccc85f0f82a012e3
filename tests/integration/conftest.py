"""Real servers (uvicorn subprocesses on loopback) over one seeded tiny model, started lazily, once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.server_proc import ServerProc, make_tiny_model, start_server

MODEL = "tiny"
COMMON = ["--served-model-name", MODEL, "--max-prompt-tokens", "3000", "--max-n", "4", "--log-level", "info"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / MODEL)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


def _serve(model_dir: Path, log_dir: Path, *args: str) -> Iterator[ServerProc]:
    with start_server(["--model", str(model_dir), *COMMON, *args], log_dir=log_dir) as srv:
        yield srv


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    """Default tiers (FP8 hot, FP16 cold)."""
    yield from _serve(
        tiny_model_dir,
        log_dir,
        "--max-num-seqs",
        "8",
        "--max-tokens-cap",
        "64",
        "--checkpoint-interval",
        "16",
    )


@pytest.fixture(scope="session")
def lossless_server(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    """FP32 tiers and a hot window of one checkpoint (older ones live only in the cold tier)."""
    yield from _serve(
        tiny_model_dir,
        log_dir,
        "--hot-dtype", "fp32", "--cold-dtype", "fp32", "--hot-window", "1",
        "--max-num-seqs", "8", "--checkpoint-interval", "16",
    )  # fmt: skip


@pytest.fixture(scope="session")
def nocache_server(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    yield from _serve(tiny_model_dir, log_dir, "--no-cache", "--max-num-seqs", "8")


@pytest.fixture(scope="session")
def one_slot_server(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    """One live slot, long generations allowed, two API keys."""
    yield from _serve(
        tiny_model_dir,
        log_dir,
        "--max-num-seqs", "1", "--max-tokens-cap", "100000", "--api-key", "key-a", "--api-key", "key-b",
    )  # fmt: skip


@pytest.fixture
def client(server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


def metric(base_url: str, sample_name: str, client: httpx.Client | None = None, **labels: str) -> float:
    """Sum of the samples named `sample_name` whose labels include `labels` (0 if none); scraped on a fresh
    connection, or on `client`'s."""
    text = (
        client.get("/metrics") if client is not None else httpx.get(base_url + "/metrics", timeout=30)
    ).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += float(sample.value)
    return total


def chat(
    base_url: str,
    messages: list[dict[str, str]],
    session: str | None = None,
    headers: dict[str, str] | None = None,
    **fields: object,
) -> dict[str, object]:
    """A greedy chat completion (status checked)."""
    body: dict[str, object] = {
        "model": MODEL,
        "messages": messages,
        "temperature": 0,
        "max_tokens": 16,
        **fields,
    }
    all_headers = {**(headers or {}), **({"X-Session-ID": session} if session else {})}
    resp = httpx.post(base_url + "/v1/chat/completions", json=body, headers=all_headers, timeout=120)
    assert resp.status_code == 200, resp.text
    out: dict[str, object] = resp.json()
    return out

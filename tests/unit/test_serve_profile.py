"""bench/serve_profile.py: its reading of py-spy's collapsed stacks, and its `--rounds` load on a real server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench._common import Clients, Texts
from bench.serve_profile import rounds, shares
from server.model.defaults import bundled_model_dir
from tests.integration.server_proc import start_server

ENGINE = 'process 10:"python -m server.serve";process 11:"python -c spawn_main"'
SERVER = 'process 10:"python -m server.serve"'


def test_samples_are_grouped_per_process_and_thread_with_inclusive_and_self_counts(tmp_path: Path) -> None:
    stacks = tmp_path / "py-spy.txt"
    stacks.write_text(
        "\n".join([
            f"{ENGINE};thread (21): tssc-model_0;run (a/worker.py:3);execute (a/worker.py:9);decode (runner.py:4) 6",
            f"{ENGINE};thread (21): tssc-model_0;run (a/worker.py:3);execute (a/worker.py:9) 2",
            f"{SERVER};thread (10): MainThread;loop (events.py:1);send (h11.py:7) 5",
            "a malformed line",
        ])
    )  # fmt: skip
    got = shares(stacks)
    assert set(got) == {
        "engine process (process 11), thread tssc-model_0",
        "server process (process 10), thread MainThread",
    }
    total, incl, own = got["engine process (process 11), thread tssc-model_0"]
    assert total == 8
    assert incl["execute (worker.py)"] == 8 and incl["decode (runner.py)"] == 6
    assert own["decode (runner.py)"] == 6 and own["execute (worker.py)"] == 2 and own["run (worker.py)"] == 0
    total, incl, own = got["server process (process 10), thread MainThread"]
    assert (total, own["send (h11.py)"], incl["loop (events.py)"]) == (5, 5, 5)


@pytest.mark.slow
def test_rounds_send_whole_rounds_until_the_deadline() -> None:
    """`--rounds` load: every round sends all its streams at once and waits for them; rounds go on until the
    deadline has passed (at least one)."""
    with start_server(["--served-model-name", "bench"]) as srv:
        clients = Clients(srv.base_url, 1)
        try:
            texts = Texts(bundled_model_dir())
            started = time.perf_counter()
            one = rounds(clients, texts, "bench", 3, 0.0, new_tokens=8)
            took = time.perf_counter() - started
            more = rounds(clients, texts, "bench", 3, time.perf_counter() + 3 * took, new_tokens=8)
        finally:
            clients.close()
    assert one.requests == 3 and one.tok_s > 0
    assert more.requests >= 6 and more.requests % 3 == 0

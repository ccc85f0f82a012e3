"""bench/serve_profile.py's reading of py-spy's collapsed stacks (the profile itself needs py-spy and a load)."""

from __future__ import annotations

from pathlib import Path

from bench.serve_profile import shares

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

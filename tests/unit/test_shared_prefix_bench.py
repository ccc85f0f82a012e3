"""bench/shared_prefix.py on the bundled model, a few conversations: the shared phase reuses the system prompt
for every conversation and prefills fewer tokens than the isolated (salted) phase."""

from __future__ import annotations

import pytest

from bench.shared_prefix import main

pytestmark = pytest.mark.slow


def test_shared_phase_reuses_the_system_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--conversations", "3", "--system-tokens", "120"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    isolated, shared = (r for r in rows if r[0].lstrip("| ").startswith(("isolated", "shared")))
    assert isolated[3] == "0 / 3" and shared[3] == "3 / 3"
    assert int(shared[4].replace(",", "")) < int(isolated[4].replace(",", ""))

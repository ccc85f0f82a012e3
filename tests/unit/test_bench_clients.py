"""The benches' client processes (`bench._common.Clients`) are warm before any timed request: each has sent
one request through the code a job takes (a process's first request pays for lazy imports and set-up,
which fell on a lone stream's every timed request)."""

from __future__ import annotations

import time

import pytest

from bench._common import Clients
from tests.integration.server_proc import start_server


def _health_lines(text: str) -> int:
    return sum("GET /health 200" in line for line in text.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 3])
def test_every_client_process_sends_one_request_before_the_jobs(procs: int) -> None:
    with start_server([]) as srv:
        time.sleep(0.2)  # the readiness polls' log lines are written
        before = _health_lines(srv.log_path.read_text())
        clients = Clients(srv.base_url, procs)
        try:
            time.sleep(0.2)
            assert _health_lines(srv.log_path.read_text()) - before == procs
        finally:
            clients.close()

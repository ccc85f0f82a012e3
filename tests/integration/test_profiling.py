"""POST /start_profile and /stop_profile (`--profile-dir`): a torch profiler recording of the model worker
thread over real requests, written as a Chrome trace, in both engine modes; refused when off or out of
turn, and the server serves on."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import COMMON, MODEL
from tests.integration.server_proc import ServerProc, start_server

BODY = {"model": MODEL, "prompt": "profile me", "max_tokens": 4, "ignore_eos": True}


def _complete(client: httpx.Client) -> None:
    resp = client.post("/v1/completions", json=BODY)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("mode", [[], ["--engine-process"]], ids=["thread", "engine-process"])
def test_a_recording_holds_the_steps_of_the_requests_served_meanwhile(
    tiny_model_dir: Path, log_dir: Path, tmp_path: Path, mode: list[str]
) -> None:
    traces = tmp_path / "traces"
    flags = ["--model", str(tiny_model_dir), *COMMON, "--profile-dir", str(traces), *mode]
    with (
        start_server(flags, log_dir=log_dir) as srv,
        httpx.Client(base_url=srv.base_url, timeout=60) as client,
    ):
        assert client.post("/stop_profile").json()["error"]["code"] == "not_profiling"
        assert client.post("/start_profile").json() == {"status": "recording"}
        second = client.post("/start_profile")
        assert second.status_code == 409 and second.json()["error"]["code"] == "profiling"
        _complete(client)
        stopped = client.post("/stop_profile")
        assert stopped.status_code == 200
        trace = Path(stopped.json()["trace"])
        assert trace.parent == traces
        names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
        assert any(n.startswith("aten::") for n in names)  # the step's model ops
        assert any("ModelWorker.execute" in n or "aten::linear" in n for n in names)
        assert client.post("/stop_profile").status_code == 409  # that recording is over
        _complete(client)  # and the server serves on


def test_profiling_is_off_without_a_directory(server: ServerProc) -> None:
    for path in ("/start_profile", "/stop_profile"):
        resp = httpx.post(server.base_url + path, timeout=30)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "profiling_off"

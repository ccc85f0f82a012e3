"""Settings: every flag parses, has a TSSC_* variable, and the command line wins over the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from server.settings import (
    Settings,
    build_parser,
    default_model_path,
    parse_settings,
    resolve_engine_process,
)

ISSUE_FLAGS = [
    "--model",
    "--host",
    "--port",
    "--device",
    "--dtype",
    "--max-num-seqs",
    "--hot-window",
    "--hot-bytes",
    "--cold-bytes",
    "--hot-dtype",
    "--cold-dtype",
    "--disk-dir",
    "--disk-bytes",
    "--checkpoint-interval",
    "--no-cache",
    "--api-key",
    "--max-prompt-tokens",
    "--max-body-bytes",
    "--max-concurrent-requests",
    "--max-tokens-cap",
    "--max-n",
    "--log-level",
    "--served-model-name",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TSSC_"):
            monkeypatch.delenv(name)


def test_defaults_match_the_issue() -> None:
    s = parse_settings([])
    assert s.host == "127.0.0.1"
    assert (s.hot_dtype, s.cold_dtype, s.hot_kv_dtype) == ("fp8", "fp16", "model")
    assert s.device == "auto"
    assert s.no_cache is False
    assert s.api_key == []
    assert s.model == default_model_path()
    assert Path(s.model).parts[-3:] == ("server", "assets", "demo-mamba2")


def test_every_issue_flag_exists() -> None:
    options = {opt for action in build_parser()._actions for opt in action.option_strings}
    missing = [f for f in ISSUE_FLAGS if f not in options]
    assert not missing


def test_every_field_has_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSSC_PORT", "9123")
    monkeypatch.setenv("TSSC_HOT_BYTES", "64MiB")
    monkeypatch.setenv("TSSC_NO_CACHE", "true")
    monkeypatch.setenv("TSSC_HOT_DTYPE", "FP32")
    monkeypatch.setenv("TSSC_HOT_KV_DTYPE", "FP8")
    monkeypatch.setenv("TSSC_DISK_DIR", "/tmp/tssc-disk")
    monkeypatch.setenv("TSSC_API_KEY", "alpha, beta")
    s = parse_settings([])
    assert s.port == 9123
    assert s.hot_bytes == 64 * 2**20
    assert s.no_cache is True
    assert s.hot_dtype == "fp32"
    assert s.hot_kv_dtype == "fp8"
    assert s.disk_dir == Path("/tmp/tssc-disk")
    assert s.api_key == ["alpha", "beta"]


def test_command_line_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSSC_PORT", "9123")
    monkeypatch.setenv("TSSC_API_KEY", "from-env")
    s = parse_settings(["--port", "9555", "--api-key", "a", "--api-key", "b"])
    assert s.port == 9555
    assert s.api_key == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000), ("4096", 4096), ("1 kib", 1024)],
)
def test_byte_sizes_accept_units(text: str, expected: int) -> None:
    assert parse_settings(["--cold-bytes", text]).cold_bytes == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["--hot-dtype", "int4"],
        ["--cold-dtype", "fp8"],
        ["--hot-kv-dtype", "fp16"],
        ["--device", "tpu"],
        ["--port", "70000"],
        ["--max-num-seqs", "0"],
        ["--prefill-budget", "0"],
        ["--hot-bytes", "lots"],
        ["--log-level", "loud"],
        ["--log-format", "xml"],
    ],
)
def test_bad_values_are_rejected(argv: list[str]) -> None:
    with pytest.raises(ValidationError):
        parse_settings(argv)


def test_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(["--no-such-flag"])
    assert info.value.code == 2


def test_served_model_name_defaults_to_the_model_directory() -> None:
    assert parse_settings(["--model", "/models/my-mamba/"]).model_name == "my-mamba"
    assert parse_settings(["--model", "/m/x", "--served-model-name", "chat"]).model_name == "chat"


@pytest.mark.parametrize("model", ["/m//x", "x/.", "/", "rel", "/models/a.b/", "./m"])
def test_the_model_name_is_the_paths_last_part_or_the_path(model: str) -> None:
    expected = Path(model.rstrip("/")).name or model
    assert Settings(model=model).model_name == expected
    assert Settings(model=model).model_name == expected  # again, from the cache


def test_settings_are_frozen() -> None:
    s = Settings(port=1234)
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]


def test_log_format_defaults_to_auto_and_follows_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_settings([]).log_format == "auto"
    monkeypatch.setenv("TSSC_LOG_FORMAT", "JSON")
    assert parse_settings([]).log_format == "json"
    assert parse_settings(["--log-format", "text"]).log_format == "text"


def test_serve_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import package_version

    with pytest.raises(SystemExit) as info:
        parse_settings(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"tssc {package_version()}"


def test_engine_process_is_chosen_per_device_unless_set_by_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse_settings([]).engine_process is None  # unset: decided for the device
    assert parse_settings(["--engine-process"]).engine_process is True
    assert parse_settings(["--no-engine-process"]).engine_process is False
    decided = lambda *argv: resolve_engine_process(parse_settings(list(argv))).engine_process
    assert decided("--device", "cpu") is False
    assert decided("--device", "cuda") is True  # decided from the flag alone: no CUDA needed to say so
    assert decided("--device", "cuda", "--no-engine-process") is False
    assert decided("--device", "cpu", "--engine-process") is True
    assert decided() is torch.cuda.is_available()
    monkeypatch.setenv("TSSC_ENGINE_PROCESS", "1")
    assert parse_settings([]).engine_process is True
    monkeypatch.setenv("TSSC_ENGINE_PROCESS", "false")
    assert decided("--device", "cuda") is False


def test_an_app_that_builds_its_engine_decides_the_engine_process_for_the_device(
    tmp_path: Path,
) -> None:
    from server.api import create_app

    settings = Settings(model=str(tmp_path), device="cuda")
    assert create_app(settings).state.tssc.settings.engine_process is True
    assert Settings(model=str(tmp_path), device="cpu").engine_process is None
    assert create_app(Settings(model=str(tmp_path), device="cpu")).state.tssc.settings.engine_process is False


def test_settings_travel_to_the_engine_core_intact() -> None:
    import pickle

    settings = parse_settings(
        [
            "--engine-process",
            "--hot-bytes",
            "1MiB",
            "--api-key",
            "k",
            "--disk-dir",
            "/d",
            "--remote-password",
            "pw",
        ]
    )
    assert pickle.loads(pickle.dumps(settings)) == settings  # the spawned core receives them pickled

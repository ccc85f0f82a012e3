"""`tssc generate` end to end on tiny checkpoints of both formats, `python -m server` wiring, `--version`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import server.cli
from server.cli import main, package_version, pyproject_version
from tests.tiny_models import make_hf_checkpoint, make_state_spaces_checkpoint, make_tokenizer


def _model(tmp_path: Path, fmt: str = "hf", arch: str = "mamba2") -> str:
    make = make_hf_checkpoint if fmt == "hf" else make_state_spaces_checkpoint
    make(tmp_path, arch)
    make_tokenizer(tmp_path)
    return str(tmp_path)


def _generate(capsys: pytest.CaptureFixture[str], model: str, *extra: str) -> tuple[int, str, str]:
    rc = main(["generate", "--model", model, "--prompt", "def fib", "--max-tokens", "6", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    ("fmt", "arch"),
    [("hf", "mamba2"), ("state-spaces", "mamba2"), ("hf", "mamba1"), ("state-spaces", "mamba1")],
)
def test_generate_prints_completion_and_speeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, arch: str
) -> None:
    rc, out, err = _generate(capsys, _model(tmp_path, fmt, arch), "--temperature", "0.7", "--seed", "3")
    assert rc == 0
    assert out.startswith("def fib") and len(out) > len("def fib\n")
    assert "prefill:" in err and "decode:" in err and "tok/s" in err


def test_seeded_and_greedy_generation_repeat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(tmp_path)
    for extra in ((), ("--temperature", "1.0", "--seed", "5")):
        assert _generate(capsys, model, *extra)[1] == _generate(capsys, model, *extra)[1]


def test_bad_model_directory_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _generate(capsys, str(tmp_path))
    assert rc == 2
    assert "no config.json" in err and "Traceback" not in err


def test_python_dash_m_server_runs_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [
        sys.executable,
        "-m",
        "server",
        "generate",
        "--model",
        _model(tmp_path),
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
    ]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("hi") and "decode:" in done.stderr


def _version_output(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """stdout of `tssc ARGV`, which must succeed (argparse's --version exits 0; `serve` returns 0)."""
    rc: object
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    assert rc == 0
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize("argv", [["--version"], ["serve", "--version"]])
def test_version_prints_the_installed_package_version(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    import importlib.metadata

    expected = importlib.metadata.version(server.cli.DISTRIBUTION)
    assert _version_output(capsys, *argv) == f"tssc {expected}"


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata
    import tomllib

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    declared = tomllib.loads(server.cli.PYPROJECT.read_text())["project"]["version"]
    assert package_version() == declared


def test_pyproject_version_of_a_missing_or_versionless_file_is_unknown(tmp_path: Path) -> None:
    assert pyproject_version(tmp_path / "absent.toml") == "unknown"
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert pyproject_version(tmp_path / "pyproject.toml") == "unknown"


def test_python_dash_m_server_serve_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server.serve", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == f"tssc {package_version()}"

"""The `tssc` command: `generate`, `serve` and `train`, and `tssc --version`."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
import tomllib
from pathlib import Path

DISTRIBUTION = "tiered-ssm-state-cache"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def package_version() -> str:
    """The installed distribution's version; from a source checkout that is not installed, the version
    its pyproject.toml declares ("unknown" when neither is found)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return pyproject_version(PYPROJECT)


def pyproject_version(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from server.serve import serve

        return serve(argv[1:])
    if argv and argv[0] == "train":
        from server.train import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tssc", description="Tiered SSM state cache: Mamba inference")
    parser.add_argument("--version", action="version", version=f"tssc {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the OpenAI-compatible server (tssc serve --help)")
    sub.add_parser("train", help="train the bundled demo model (tssc train --help)")
    from server import generate

    generate.add_arguments(sub.add_parser("generate", help="print one completion and the tokens/s"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from server.model.loader import ModelLoadError

    try:
        return generate.run(args)
    except (ModelLoadError, RuntimeError, OSError) as exc:
        print(f"tssc: error: {exc}", file=sys.stderr)
        return 2

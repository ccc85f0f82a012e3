"""The `tssc` command: `generate`, `serve` and `train`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from server.serve import serve

        return serve(argv[1:])
    if argv and argv[0] == "train":
        from server.train import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tssc", description="Tiered SSM state cache: Mamba inference")
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

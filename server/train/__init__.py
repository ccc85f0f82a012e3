"""Training of the bundled demo model: `python -m server.train --out-dir DIR [--seed N] [--smoke]`.

Modules: corpus (the stdlib source), tokenizer (byte-level BPE + chat template), chat_examples
(ast-derived chat turns), data (streams and eval windows), init, loop (the optimiser loop),
evaluate (bits per byte), samples, card (the model card), measure_cpu, run (one run end to end),
cli (arguments).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m server.train` and `tssc train`."""
    from server.train.cli import main as cli_main

    return cli_main(argv)

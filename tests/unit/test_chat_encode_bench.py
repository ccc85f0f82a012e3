"""`bench/chat_encode_cpu.py` on the bundled tokenizer: its check that the incremental encoding equals
`encode_chat` passes (it compared a tuple with a list, and so failed on every run, until session 17), and
the incremental turn reuses the previous turn's tokens."""

from __future__ import annotations

from bench.chat_encode_cpu import measure
from server.model.defaults import bundled_model_dir
from server.model.tokenizer import Tokenizer


def test_the_bench_checks_and_reports_a_reusing_turn() -> None:
    tok = Tokenizer.from_pretrained(bundled_model_dir())
    row = measure(tok, 13, 2_000, repeats=1)
    assert row.messages == 13 and 0 < row.reused < row.tokens

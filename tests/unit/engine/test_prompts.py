"""`LastPrompts`: each session's last prompt, bounded in tokens, and how much of it a new prompt shares."""

from __future__ import annotations

import random
from typing import Any

import pytest

from cache.prefix import common_prefix_len
from server.engine.prompts import LastPrompts, prompt_key
from server.engine.types import GenerationRequest, SamplingParams


def test_the_prefix_is_what_the_new_prompt_shares_with_the_last_one() -> None:
    last = LastPrompts()
    key = prompt_key(GenerationRequest("r", (1,), SamplingParams(), namespace="k", session_id="s"))
    assert key == ("k", "s", None) and last.prefix(key, (1, 2, 3)) == 0
    last.remember(key, (1, 2, 3))
    assert last.prefix(key, (1, 2, 3, 4)) == 3  # a follow-up
    assert last.prefix(key, (1, 2, 3)) == 3  # a regenerate
    assert last.prefix(key, (1, 2)) == 2  # shorter
    assert last.prefix(key, (1, 9, 3, 4)) == 1  # an edit
    assert last.prefix(key, (9, 2, 3)) == 0
    assert last.prefix(("k", "t", None), (1, 2, 3, 4)) == 0  # another session


def _edited(base: Any, at: int) -> Any:
    """`base` with its element at `at` changed."""
    if isinstance(base, str):
        return base[:at] + ("x" if base[at] != "x" else "y") + base[at + 1 :]
    if isinstance(base, bytes):
        return base[:at] + bytes([base[at] ^ 1]) + base[at + 1 :]
    return (*base[:at], base[at] + 1, *base[at + 1 :])


@pytest.mark.parametrize("n", [1, 2, 1023, 1024, 1025, 9000, 20_000])
def test_common_prefix_len_finds_the_first_difference_wherever_it_is(n: int) -> None:
    rng = random.Random(n)
    ids = tuple(rng.randrange(50_000) for _ in range(n))
    text = "".join(rng.choice("ab\u00e9\U0001f600") for _ in range(n))
    cases = {rng.randrange(n) for _ in range(20)} | {0, n - 1, 1023 % n, 1024 % n, 2047 % n}
    bases: list[Any] = [ids, text, text.encode()[:n]]
    for base in bases:
        for at in cases:
            edited = _edited(base, at)
            assert common_prefix_len(base, edited) == common_prefix_len(edited, base) == at
            assert common_prefix_len(base, edited[: at + 1]) == at
        assert common_prefix_len(base, base + base[:1]) == common_prefix_len(base, base) == n
        assert common_prefix_len(base[:-1], base) == n - 1
        assert common_prefix_len(base, base[:0]) == 0


def test_the_oldest_sessions_are_forgotten_past_the_token_budget() -> None:
    last = LastPrompts(max_tokens=10)
    keys = [("k", str(i), None) for i in range(4)]
    for key in keys[:3]:
        last.remember(key, tuple(range(4)))
    assert last.tokens == 8 and last.get(keys[0]) is None  # 12 > 10: the first went
    last.remember(keys[1], tuple(range(2)))  # replaced, and now the newest
    last.remember(keys[3], tuple(range(4)))
    assert last.get(keys[2]) == tuple(range(4)) and last.get(keys[1]) == (0, 1) and last.tokens == 10
    last.remember(keys[3], tuple(range(11)))  # longer than the budget: not kept, nor its older prompt
    assert last.get(keys[3]) is None and last.tokens == 6

"""`LastPrompts`: each session's last prompt, bounded in tokens, and whether a new prompt starts with it."""

from __future__ import annotations

from server.engine.prompts import LastPrompts, prompt_key
from server.engine.types import GenerationRequest, SamplingParams


def test_the_prefix_is_the_last_prompt_only_when_the_new_one_starts_with_it() -> None:
    last = LastPrompts()
    key = prompt_key(GenerationRequest("r", (1,), SamplingParams(), namespace="k", session_id="s"))
    assert key == ("k", "s", None) and last.prefix(key, (1, 2, 3)) == 0
    last.remember(key, (1, 2, 3))
    assert last.prefix(key, (1, 2, 3, 4)) == 3
    assert last.prefix(key, (1, 2, 3)) == 3
    assert last.prefix(key, (1, 2)) == 0  # shorter
    assert last.prefix(key, (1, 9, 3, 4)) == 0  # an edit
    assert last.prefix(("k", "t", None), (1, 2, 3, 4)) == 0  # another session


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

"""AnswerLog on the events the engine's own stop rules make (`Seq.append`): an answer is kept with the ids
whose text the client got, or not at all."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from server.api.answers import AnswerLog
from server.engine.request import Seq, stop_ids
from server.engine.types import GenerationRequest, SamplingParams

EOS = 25  # a letter vocabulary: token i is chr(97 + i), 'z' the EOS
DECODE = lambda ids: "".join(chr(97 + i) for i in ids)


def _answers(params: SamplingParams, choices: Sequence[Sequence[int]]) -> list[tuple[str, list[int]]]:
    """Each choice's tokens through a real `Seq` (until it finishes), into one log."""
    log = AnswerLog(len(choices), stop_ids(params, (EOS,)), params.min_tokens)
    for index, tokens in enumerate(choices):
        seq = Seq.create(GenerationRequest(f"r{index}", (0,), params), DECODE, eos_ids=(EOS,), now=0.0)
        for token in tokens:
            event = seq.append(token, now=1.0)
            log.add(index, event)
            if event.finish_reason is not None:
                break
    return [(a.text, list(a.ids)) for a in log.answers()]


def test_an_answer_ends_without_its_stop_token_or_whole_at_max_tokens() -> None:
    params = SamplingParams(max_tokens=4, stop_token_ids=(3,))
    got = _answers(params, [[0, 1, EOS], [7, 3], [2, 2, 2, 2]])
    assert got == [("ab", [0, 1]), ("h", [7]), ("cccc", [2, 2, 2, 2])]


@pytest.mark.parametrize(
    "params,tokens",
    [
        (
            SamplingParams(max_tokens=8, stop=("cd",)),
            [1, 2, 3, 4],
        ),  # a stop string: the ids run past the text
        (SamplingParams(max_tokens=8), [1, 2]),  # not finished (a client gone, an abort)
    ],
)
def test_no_answer_whose_ids_are_not_its_text(params: SamplingParams, tokens: list[int]) -> None:
    assert _answers(params, [tokens]) == []


def test_the_eos_is_text_with_ignore_eos_and_before_min_tokens() -> None:
    assert _answers(SamplingParams(max_tokens=3, ignore_eos=True), [[0, EOS, 1]]) == [("azb", [0, EOS, 1])]
    assert stop_ids(SamplingParams(ignore_eos=True, stop_token_ids=(3,)), (EOS,)) == {3}
    got = _answers(SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(3,)), [[3, 1, 3]])
    assert got == [("db", [3, 1])]  # the first 3 came before min_tokens: sampled text, not a stop

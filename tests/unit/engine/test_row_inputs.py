"""`RowInputsCache`: a step's sampling inputs are reused while its rows stay the same, rebuilt otherwise."""

from __future__ import annotations

import torch

from server.engine.request import Seq
from server.engine.row_inputs import RowInputsCache
from server.engine.types import GenerationRequest, SamplingParams

CPU = torch.device("cpu")


def _make_seq(rid: str, slot: int, **params: object) -> Seq:
    sp = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **params})  # type: ignore[arg-type]
    seq = Seq.create(GenerationRequest(rid, (1, 2, 3), sp), lambda ids: "x" * len(ids), (0,), 0.0)
    seq.slot = slot
    return seq


def test_the_same_rows_reuse_the_inputs_and_other_rows_rebuild_them() -> None:
    cache = RowInputsCache(CPU, vocab_limit=10)
    a, b = _make_seq("a", 3), _make_seq("b", 1, temperature=0.5)
    first = cache.get([a, b])
    assert cache.get([a, b]) is first
    assert first.slots.tolist() == [3, 1] and first.batch.temperature.tolist() == [0.0, 0.5]
    swapped = cache.get([b, a])
    assert swapped is not first and swapped.slots.tolist() == [1, 3]
    twin = _make_seq("a", 3, temperature=0.75)  # same id and slot, another request
    assert cache.get([twin, a]).batch.temperature.tolist() == [0.75, 0.0]


def test_a_row_reaching_min_tokens_rebuilds_its_banned_tokens() -> None:
    cache = RowInputsCache(CPU, vocab_limit=10)
    seq = _make_seq("a", 0, min_tokens=1)
    short = cache.get([seq])
    assert short.batch.logit_adds is not None  # EOS (id 0) banned before min_tokens
    seq.output.append(5)
    done = cache.get([seq])
    assert done is not short and done.batch.logit_adds is None


def test_penalised_rows_are_marked_only_when_a_row_has_a_penalty() -> None:
    cache = RowInputsCache(CPU, vocab_limit=10)
    assert cache.get([_make_seq("a", 0)]).penalised is None
    inputs = cache.get([_make_seq("b", 0), _make_seq("c", 1, presence_penalty=0.5)])
    assert inputs.penalised is not None and inputs.penalised.tolist() == [0, 1]

"""The model worker's sampling parameters: a decode step whose rows are the last step's reuses their tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.request import Seq
from server.engine.types import GenerationRequest, SamplingParams
from server.engine.worker import ModelWorker
from server.model.loader import load_model
from server.model.runner import ModelRunner
from tests.tiny_models import make_chat_model_dir


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> ModelWorker:
    model_dir: Path = make_chat_model_dir(tmp_path_factory.mktemp("tiny-worker"), seed=3, tok_vocab=300)
    return ModelWorker(ModelRunner(load_model(model_dir)[1], max_slots=4), None)


def _seq(rid: str, **params: object) -> Seq:
    sp = SamplingParams(**{"max_tokens": 10, **params})  # type: ignore[arg-type]
    return Seq.create(GenerationRequest(rid, (5, 6), sp), lambda ids: "", eos_ids=(0,), now=0.0)


def test_the_same_rows_reuse_their_sampling_tensors_and_other_rows_do_not(worker: ModelWorker) -> None:
    a, b, c = _seq("a", temperature=0.0), _seq("b", temperature=0.7, top_k=5), _seq("c", top_p=0.5)
    first = worker._sampling_batch([a, b])
    assert worker._sampling_batch([a, b]) is first  # a steady decode step
    swapped = worker._sampling_batch([b, a])  # the same requests in another order: rows differ
    assert swapped is not first
    assert swapped.temperature.tolist() == pytest.approx([0.7, 0.0]) and swapped.top_k.tolist() == [5, 0]
    grown = worker._sampling_batch([b, a, c])
    assert grown.top_p.tolist() == pytest.approx([1.0, 1.0, 0.5]) and grown.use_top_p


def test_rows_with_banned_tokens_are_built_every_step(worker: ModelWorker) -> None:
    early = _seq("m", min_tokens=2, ignore_eos=False)  # its EOS (0) is banned until 2 tokens are out
    other = _seq("o")
    first = worker._sampling_batch([early, other])
    assert first.logit_adds is not None
    assert worker._sampling_batch([early, other]) is not first  # not kept while a row bans tokens
    early.output.extend([7, 8])  # past min_tokens: nothing banned any more
    free = worker._sampling_batch([early, other])
    assert free.logit_adds is None
    assert worker._sampling_batch([early, other]) is free


def test_a_reused_batch_samples_each_rows_own_parameters(worker: ModelWorker) -> None:
    biased = _seq("x", temperature=0.0, logit_bias=((9, 100.0),))
    plain = _seq("y", temperature=0.0)
    logits = torch.zeros(2, worker.runner.vocab)
    logits[:, 3] = 1.0
    for _ in range(3):  # built once, then reused
        out = worker._sample_device([biased, plain], logits.clone())
        assert out.tokens.tolist() == [9, 3]


def test_decode_ahead_skips_every_rows_stop_ids_and_recomputes_them_when_the_rows_change(
    worker: ModelWorker,
) -> None:
    from server.engine.ahead import DecodeAhead

    ahead = DecodeAhead(worker.runner)
    a = _seq("a", stop_token_ids=(3,))  # eos 0 as well (not ignore_eos)
    b = _seq("b", ignore_eos=True, stop_token_ids=(9,))
    c = _seq("c", ignore_eos=True)
    assert ahead._stop_ids([a, b]) == {0, 3, 9}
    assert ahead._stop_ids([a, b]) is ahead._stop_ids([a, b])  # a steady step: kept
    assert ahead._stop_ids([b, c]) == {9}
    assert ahead._stop_ids([c]) == frozenset()

"""Engine.start_profile / stop_profile (`--profile-dir`) on the tiny model: a recording of the worker thread
holds the steps served meanwhile; one left running stops by itself after `profile_max_seconds`, its trace
written; with no directory, profiling is refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from server.engine import Engine, EngineConfig, EngineError
from server.engine.types import GenerationRequest, SamplingParams
from server.model.loader import load_model
from server.model.runner import ModelRunner
from server.model.tokenizer import Tokenizer
from tests.tiny_models import make_chat_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-profiled"), seed=3, tok_vocab=300)


def _engine(model_dir: Path, profile_dir: Path | None) -> Engine:
    runner = ModelRunner(load_model(model_dir)[1], 2)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    return Engine(runner, tokenizer, None, config=EngineConfig(max_slots=2), profile_dir=profile_dir)


async def _generate(engine: Engine) -> int:
    req = GenerationRequest("r", (5, 6, 7, 8), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    return len([e async for e in engine.generate(req)])


def _ops(trace: Path) -> set[str]:
    return {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}


def test_a_recording_holds_the_steps_and_an_abandoned_one_stops_itself(
    model_dir: Path, tmp_path: Path
) -> None:
    async def go() -> tuple[str | None, str | None, list[Path]]:
        engine = _engine(model_dir, tmp_path)
        engine.profile_max_seconds = 0.5
        engine.start()
        try:
            assert await engine.start_profile() and not await engine.start_profile()
            assert await _generate(engine) == 3
            stopped = await engine.stop_profile()
            assert await engine.start_profile()  # then abandoned
            await asyncio.sleep(1.5)
            late = await engine.stop_profile()  # the timer stopped it already
            return stopped, late, sorted(tmp_path.glob("*.json"))
        finally:
            await engine.stop()

    stopped, late, traces = asyncio.run(go())
    assert stopped is not None and late is None and len(traces) == 2
    assert any(op.startswith("aten::") for op in _ops(Path(stopped)))


def test_profiling_is_refused_without_a_directory(model_dir: Path) -> None:
    async def go() -> None:
        engine = _engine(model_dir, None)
        engine.start()
        try:
            for call in (engine.start_profile, engine.stop_profile):
                with pytest.raises(EngineError, match="--profile-dir"):
                    await call()
        finally:
            await engine.stop()

    asyncio.run(go())

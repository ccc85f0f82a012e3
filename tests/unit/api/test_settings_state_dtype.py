"""`--state-dtype` / `TSSC_STATE_DTYPE`: fp32 by default, bf16 on request, nothing else; its dtype map
covers every value the flag accepts (`build_engine` hands the dtype to `make_runner`, see
tests/unit/engine/test_state_dtype_engine.py)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from pydantic import ValidationError

from server.model.state import STATE_DTYPES
from server.settings import StateDType, build_parser, parse_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TSSC_"):
            monkeypatch.delenv(name)


def test_the_default_is_fp32() -> None:
    assert parse_settings([]).state_dtype == "fp32"


def test_the_flag_and_the_env_var_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_settings(["--state-dtype", "bf16"]).state_dtype == "bf16"
    monkeypatch.setenv("TSSC_STATE_DTYPE", "BF16")
    assert parse_settings([]).state_dtype == "bf16"
    assert parse_settings(["--state-dtype", "fp32"]).state_dtype == "fp32"  # the command line wins


@pytest.mark.parametrize("value", ["fp16", "fp8", "int8", ""])
def test_other_dtypes_are_rejected(value: str) -> None:
    with pytest.raises(ValidationError):
        parse_settings(["--state-dtype", value])


def test_the_help_lists_the_choices() -> None:
    (action,) = [a for a in build_parser()._actions if "--state-dtype" in a.option_strings]
    assert action.metavar == "{fp32,bf16}" and "TSSC_STATE_DTYPE" in (action.help or "")


def test_every_choice_maps_to_a_torch_dtype() -> None:
    assert {name: STATE_DTYPES[name] for name in get_args(StateDType)} == {
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
    }

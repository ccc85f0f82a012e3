"""The scale rule of the scaled codecs at the edges: the frexp exponent of the row max, bit-built powers of
two equal to ldexp's, zero rows at 2**-top, and rows of tiny subnormals that never get a zero scale."""

from __future__ import annotations

import pytest
import torch

from cache.codec import make_codec, roundtrip

TOPS = {"fp8": 8, "fp16": 15, "bf16": 15}


def _encode(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codec = make_codec(name)
    data = torch.empty(x.shape, dtype=codec.storage_dtype)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32)
    codec.encode_into(x, data, scale)
    return data, scale


@pytest.mark.parametrize("name", ["fp8", "fp16", "bf16"])
def test_scale_is_two_to_the_frexp_exponent_minus_top(name: str) -> None:
    exps = torch.arange(-120, 120, dtype=torch.int32)
    x = torch.ldexp(torch.full((exps.numel(), 4), 0.75), exps.unsqueeze(-1))  # amax = 0.75 * 2**e
    x[:, 1] *= -1.0
    _, scale = _encode(name, x)
    expected = torch.ldexp(torch.ones(exps.numel()), exps - TOPS[name])
    assert torch.equal(scale, expected)


@pytest.mark.parametrize("name", ["fp8", "fp16", "bf16"])
def test_exact_power_of_two_and_zero_rows(name: str) -> None:
    x = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-0.25, 0.125, 0.0]])
    data, scale = _encode(name, x)
    top = TOPS[name]
    assert scale.tolist() == [2.0 ** (2 - top), 2.0**-top, 2.0 ** (-1 - top)]
    assert data[1].float().abs().sum() == 0
    assert torch.equal(roundtrip(make_codec(name), x), x)


@pytest.mark.parametrize("name", ["fp8", "fp16", "bf16"])
def test_subnormal_rows_keep_a_nonzero_scale(name: str) -> None:
    tiny = torch.tensor([[1e-44, -3e-45, 0.0], [1e-40, 2e-41, -5e-42], [1.4e-45, 0.0, 0.0]])
    data, scale = _encode(name, tiny)
    assert (scale >= 2.0**-149).all() and torch.isfinite(data.float()).all()
    err = (roundtrip(make_codec(name), tiny) - tiny).abs()
    assert (err <= 2**-4 * tiny.abs().amax(-1, keepdim=True)).all()

"""Codec error bounds (derived in cache/codec.py) and overflow behaviour."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.codec import make_codec, roundtrip


def _make_state(seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 4, 8, 16), generator=g)  # (layer, head, row, d_state)
    # rows of very different magnitudes, as in real ssm states
    mags = torch.logspace(-6, 3, 8).view(1, 1, 8, 1)
    return x * mags * scale


def _encode(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codec = make_codec(name)
    data = torch.empty(x.shape, dtype=codec.storage_dtype)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32)
    codec.encode_into(x, data, scale)
    return data, scale


def test_fp8_error_within_e4m3_bound_per_vector() -> None:
    x = _make_state(0)
    err = (roundtrip(make_codec("fp8"), x) - x).abs()
    amax = x.abs().amax(-1, keepdim=True)
    assert (err <= 2**-4 * amax).all()
    # elementwise: 3 mantissa bits for normals, subnormal step 2**-9 times the scale
    _, scale = _encode("fp8", x)
    assert (err <= 2**-4 * x.abs() + 2**-10 * scale.unsqueeze(-1)).all()


def test_fp8_error_is_not_trivially_zero() -> None:
    x = _make_state(1)
    err = (roundtrip(make_codec("fp8"), x) - x).abs()
    assert err.max() > 0
    assert (err / x.abs().amax(-1, keepdim=True)).max() > 2**-7  # the bound above is tight-ish


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), log_mag=st.floats(-30, 30))
def test_fp8_bound_holds_at_any_magnitude(seed: int, log_mag: float) -> None:
    x = _make_state(seed, scale=10.0**log_mag)
    err = (roundtrip(make_codec("fp8"), x) - x).abs()
    assert (err <= 2**-4 * x.abs().amax(-1, keepdim=True)).all()


def test_scales_are_powers_of_two_and_keep_amax_in_range() -> None:
    x = _make_state(2)
    data, scale = _encode("fp8", x)
    mant, _ = torch.frexp(scale)
    assert (mant == 0.5).all()
    top = data.float().abs().amax(-1)
    assert (top >= 2**7).all() and (top <= 448).all()


def test_fp16_large_magnitude_never_overflows() -> None:
    for mag in (1e6, 1e12, 1e30):
        x = _make_state(3, scale=mag)
        y = roundtrip(make_codec("fp16"), x)
        assert torch.isfinite(y).all()
        assert ((y - x).abs() <= 2**-11 * x.abs().amax(-1, keepdim=True)).all()


def test_fp16_plain_cast_would_overflow() -> None:
    x = _make_state(3, scale=1e6)
    assert not torch.isfinite(x.half()).all()  # so the scaling above is doing the work


def test_fp16_relative_error_bound() -> None:
    x = _make_state(4)
    y = roundtrip(make_codec("fp16"), x)
    rel_ok = (y - x).abs() <= 2**-11 * x.abs() + 2**-24 * x.abs().amax(-1, keepdim=True)
    assert rel_ok.all()


def test_bf16_bound() -> None:
    x = _make_state(5)
    y = roundtrip(make_codec("bf16"), x)
    assert ((y - x).abs() <= 2**-8 * x.abs()).all()


def test_fp32_passthrough_is_exact_for_every_float_dtype() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = _make_state(6).clamp(-6e4, 6e4).to(dtype)
        assert torch.equal(roundtrip(make_codec("fp32"), x), x)


def test_zero_and_constant_vectors_roundtrip_exactly() -> None:
    x = torch.zeros(3, 5)
    x[1] = 7.0
    for name in ("fp8", "fp16", "bf16"):
        assert torch.equal(roundtrip(make_codec(name), x), x)


def test_decode_into_narrow_dtype() -> None:
    x = _make_state(7).clamp(-100, 100)
    out = roundtrip(make_codec("fp16"), x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), x.to(torch.bfloat16).float(), rtol=2**-7, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_codecs_match_eager_on_cuda() -> None:
    x = _make_state(8).cuda()
    for name in ("fp8", "fp16"):
        eager = roundtrip(make_codec(name), x)
        fused = roundtrip(make_codec(name, fused=True), x)
        assert torch.equal(eager, fused), name

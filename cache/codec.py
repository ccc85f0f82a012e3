"""Checkpoint codecs: FP8 e4m3 and FP16/BF16 with per-vector power-of-two fp32 scales, and lossless fp32.

A state tensor `x: (..., D)` (e.g. ssm `(n_layer, nheads, headdim, d_state)`) is encoded per vector along the
last axis: `data: (..., D)` in the storage dtype and `scale: (...)` fp32, with `x ~= data * scale`.

Scales are powers of two, chosen from the vector's absolute maximum `amax = m * 2**e` (0.5 <= m < 1) as
`scale = 2**(e - top)`, so `amax / scale` lies in `[2**(top-1), 2**top)`. Multiplying and dividing by a power of
two is exact in fp32, so the only error is the rounding to the storage dtype:
- fp8 e4m3 (top = 8, max finite 448): normals carry 3 mantissa bits, so `|x - x'| <= 2**-4 * |x|` for scaled
  values >= 2**-6, and `<= 2**-10 * scale` below (subnormal step 2**-9). Hence `|x - x'| <= 2**-4 * amax` per
  vector, and the elementwise bound `2**-4 * |x| + 2**-10 * scale`.
- fp16 (top = 15, max finite 65504): never overflows whatever the magnitude (1e30 is fine); relative error
  `<= 2**-11` for scaled values >= 2**-14 (elements down to ~2**-29 of the row max).
- bf16 (top = 15): relative error `<= 2**-8`.
Zero vectors get scale 2**-top and encode exactly. Non-finite inputs are not supported (states are finite).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from cache.base import Codec

log = logging.getLogger(__name__)
_FP8 = torch.float8_e4m3fn


def _encode_scaled(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, top: int, limit: float) -> None:
    amax = x.abs().amax(dim=-1).float()  # (...)
    _, exp = torch.frexp(amax)
    s = torch.ldexp(torch.ones_like(amax), exp - top)  # (...), powers of two
    scale.copy_(s)
    data.copy_((x.float() / s.unsqueeze(-1)).clamp(-limit, limit))  # (..., D), exact division by 2**k


def _decode_scaled(data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(data.float() * scale.unsqueeze(-1))


class ScaledCodec(Codec):
    """Per-vector power-of-two scaling, then a cast to `storage_dtype`.

    `fused=True` runs encode and decode through `torch.compile` (one fused kernel each instead of several
    passes over memory; meant for CUDA), falling back to eager torch ops if compilation fails.
    """

    scaled = True

    def __init__(
        self, name: str, storage_dtype: torch.dtype, top: int, limit: float, fused: bool = False
    ) -> None:
        self.name = name
        self.storage_dtype = storage_dtype
        self._top = top
        self._limit = limit
        self._encode: Callable[..., None] = _encode_scaled
        self._decode: Callable[..., None] = _decode_scaled
        self._fused = fused
        if fused:
            self._encode = torch.compile(_encode_scaled, dynamic=False)
            self._decode = torch.compile(_decode_scaled, dynamic=False)

    def encode_into(self, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        assert scale is not None
        try:
            self._encode(x.detach(), data, scale, self._top, self._limit)
        except Exception as exc:  # compilation problems must never lose a capture
            self._unfuse(exc)
            _encode_scaled(x.detach(), data, scale, self._top, self._limit)

    def decode_into(self, data: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor) -> None:
        assert scale is not None
        try:
            self._decode(data, scale, out)
        except Exception as exc:
            self._unfuse(exc)
            _decode_scaled(data, scale, out)

    def _unfuse(self, exc: Exception) -> None:
        if not self._fused:
            raise exc
        log.warning("fused %s codec unavailable (%s); using eager torch ops", self.name, exc)
        self._fused = False
        self._encode, self._decode = _encode_scaled, _decode_scaled


class PassthroughCodec(Codec):
    """Lossless: stores fp32 (exact for fp32, fp16 and bf16 states)."""

    name = "fp32"
    storage_dtype = torch.float32
    scaled = False

    def encode_into(self, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        data.copy_(x)

    def decode_into(self, data: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor) -> None:
        out.copy_(data)


def make_codec(name: str, fused: bool = False) -> Codec:
    """`name`: "fp8" | "fp16" | "bf16" | "fp32". `fused`: compile the scaled codecs (see `ScaledCodec`)."""
    if name == "fp8":
        return ScaledCodec("fp8", _FP8, top=8, limit=448.0, fused=fused)
    if name == "fp16":
        return ScaledCodec("fp16", torch.float16, top=15, limit=65504.0, fused=fused)
    if name == "bf16":
        return ScaledCodec("bf16", torch.bfloat16, top=15, limit=3.0e38, fused=fused)
    if name == "fp32":
        return PassthroughCodec()
    raise ValueError(f"unknown codec {name!r}")


def roundtrip(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    """Encode then decode `x` (fresh tensors, x's dtype): what a restore from this codec yields."""
    data = torch.empty(x.shape, dtype=codec.storage_dtype, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if codec.scaled else None
    codec.encode_into(x, data, scale)
    out = torch.empty_like(x)
    codec.decode_into(data, scale, out)
    return out

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
Zero vectors get scale 2**-top and encode exactly. The exponent is clamped at `top - 149`, so the scale never
underflows below 2**-149 (a vector of tiny subnormals keeps a nonzero scale). Scales are built from their bits
(exact on every device). Non-finite inputs are not supported (states are finite).

`fused=True` (meant for CUDA): CUDA tensors go through the Triton kernels of `cache.triton_codec` (one launch
per state tensor, bit-identical to the torch ops here; strided slot views in and out); anything they do not
handle, CPU tensors, and a box without triton run the torch ops.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from cache.base import Codec

log = logging.getLogger(__name__)
_FP8 = torch.float8_e4m3fn


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k as fp32 for int32 `k` in [-149, 127], built from bits (subnormal below -126)."""
    normal = (k + 127).clamp_min(0) << 23
    sub = torch.bitwise_left_shift(torch.ones_like(k), (k + 149).clamp(0, 22))
    return torch.where(k >= -126, normal, sub).view(torch.float32)


def _encode_scaled(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, top: int, limit: float) -> None:
    amax = x.abs().amax(dim=-1).float()  # (...)
    _, exp = torch.frexp(amax)  # (...) int32; 0 for a zero vector
    s = _pow2(exp.clamp_min(top - 149) - top)  # (...), powers of two >= 2**-149
    scale.copy_(s)
    data.copy_((x.float() / s.unsqueeze(-1)).clamp(-limit, limit))  # (..., D), exact division by 2**k


def _decode_scaled(data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(data.float() * scale.unsqueeze(-1))


class ScaledCodec(Codec):
    """Per-vector power-of-two scaling, then a cast to `storage_dtype`.

    `fused=True`: CUDA tensors run the Triton kernels (`cache.triton_codec`). If triton is missing or a kernel
    fails (e.g. it does not compile here), one warning is logged and this codec uses the torch ops from then
    on: a capture or a fetch is never lost to the kernels.
    """

    scaled = True

    def __init__(
        self, name: str, storage_dtype: torch.dtype, top: int, limit: float, fused: bool = False
    ) -> None:
        self.name = name
        self.storage_dtype = storage_dtype
        self._top = top
        self._limit = limit
        self._fused = fused
        self._kernels: ModuleType | None = None

    def encode_into(self, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        assert scale is not None
        x = x.detach()
        kernels = self._kernels_for(x)
        if kernels is not None:
            try:
                if kernels.encode(x, data, scale, self._top, self._limit):
                    return
            except Exception as exc:  # a kernel problem must never lose a capture
                self._unfuse(exc)
        _encode_scaled(x, data, scale, self._top, self._limit)

    def decode_into(self, data: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor) -> None:
        assert scale is not None
        kernels = self._kernels_for(data)
        if kernels is not None:
            try:
                if kernels.decode(data, scale, out):
                    return
            except Exception as exc:
                self._unfuse(exc)
        _decode_scaled(data, scale, out)

    def _kernels_for(self, t: torch.Tensor) -> ModuleType | None:
        """`cache.triton_codec` for a CUDA tensor of a fused codec (imported at first use), else None."""
        if not self._fused or not t.is_cuda:
            return None
        if self._kernels is None:
            try:
                from cache import triton_codec
            except Exception as exc:  # no triton (or a broken install): the torch ops
                self._unfuse(exc)
                return None
            self._kernels = triton_codec
        return self._kernels

    def _unfuse(self, exc: Exception) -> None:
        log.warning("Triton %s codec unavailable (%s); using torch ops", self.name, exc)
        self._fused = False
        self._kernels = None


class PassthroughCodec(Codec):
    """Lossless: stores fp32 (exact for fp32, fp16 and bf16 states)."""

    name = "fp32"
    storage_dtype = torch.float32
    scaled = False

    def encode_into(self, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        data.copy_(x)

    def decode_into(self, data: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor) -> None:
        out.copy_(data)


class NativeCodec(Codec):
    """Lossless for values of one dtype: stores them as they are (a hybrid model's hot KV in the model dtype,
    `cache.kv_blocks`)."""

    scaled = False

    def __init__(self, dtype: torch.dtype) -> None:
        self.storage_dtype = dtype
        self.name = "native-" + str(dtype).removeprefix("torch.")

    def encode_into(self, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        data.copy_(x)

    def decode_into(self, data: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor) -> None:
        out.copy_(data)


def make_codec(name: str, fused: bool = False) -> Codec:
    """`name`: "fp8" | "fp16" | "bf16" | "fp32". `fused`: Triton kernels for CUDA tensors (see `ScaledCodec`)."""
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

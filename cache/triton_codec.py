# mypy: disable-error-code="no-untyped-def"
# (Triton JIT kernels take untyped pointer and constexpr arguments.)
"""Triton kernels of the scaled codecs (`cache.codec.ScaledCodec`): one launch per state tensor.

Imported by `cache.codec` only for CUDA tensors, and only if triton imports. Shape letters: a state tensor
`(..., D)` is a set of R vectors of length D (the scaled axis); its leading dims must collapse to `(A, M)`
with arbitrary strides (`stride_a`, `stride_m`) and a contiguous last dim, e.g. a live-pool slot view
`pool.ssm[:, slot]: (L, h, p, n)` with strides `(S*h*p*n, p*n, n, 1)` is `A = L`, `M = h*p`. Encoded data
`(R, D)` and scales `(R,)` are contiguous (views into a cache block); an encode's may also be n such
runs at a fixed stride (n stacked states into n blocks of one arena run, `BlockLayout.rows_views`).

- `decode(data, scale, out)`: `out[r, :] = data[r, :] * scale[r]` in fp32, cast to out's dtype (RNE).
- `encode(x, data, scale, top, limit)`: bit-identical to `cache.codec._encode_scaled`: `e` the frexp
  exponent of the row's amax (0 for a zero row; at least `top - 149`), `scale = 2**(e - top)`,
  `data = clamp(x / scale, -limit, limit)` cast with round-to-nearest-even.

Exactness: the amax is taken on the bit patterns of |x| (for non-negative floats integer order is float
order), the exponent and every power of two are built from bits (no libdevice calls, whose denormal
handling differs), and `x / scale` is a multiplication by the exact power of two `2**(top - e)` (one
multiply, or two when that power exceeds the fp32 range; scaling up is exact, scaling down rounds once,
like the division). There is no division and no add, so no FMA contraction can change a result.

Both wrappers return False, launching nothing, for what they do not handle (dtypes, shapes, strides,
sizes); the caller then runs the torch ops.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE = 4096  # elements per program: bandwidth-bound for D = 128, many rows per program for small D
FLAT_BELOW = 16  # decode vectors shorter than this as a flat 1-D tile (row = offset // D)
_STORAGE = (torch.float8_e4m3fn, torch.float16, torch.bfloat16)
_OUT = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ELEMENTS = 2**31 - 4 * TILE  # data offsets (and masked overhang) stay in int32


@triton.jit
def _pow2(k):
    """2**k as fp32, built from bits, for int32 k in [-149, 127] (subnormal below -126)."""
    normal = tl.maximum(k + 127, 0) << 23
    sub = (k * 0 + 1) << tl.minimum(tl.maximum(k + 149, 0), 22)
    return tl.where(k >= -126, normal, sub).to(tl.float32, bitcast=True)


@triton.jit
def _frexp_exponent(bits):
    """The exponent e of torch.frexp (v = m * 2**e, 0.5 <= m < 1; e = 0 for v = 0), from the bits of v >= 0."""
    biased = bits >> 23
    # subnormal: v = bits * 2**-149 and the int -> fp32 conversion of bits (< 2**23) is exact
    sub = (bits.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 275
    e = tl.where(biased > 0, biased - 126, sub)
    return tl.where(bits == 0, 0, e)


@triton.jit
def _row_offsets(rows, m, stride_a, stride_m):
    """Element offset (int64) of the start of each row index `rows` in an (A, M, D) strided tensor."""
    a = rows // m
    return a.to(tl.int64) * stride_a + (rows - a * m).to(tl.int64) * stride_m


@triton.jit
def _decode_rows_kernel(
    data_ptr, scale_ptr, out_ptr,
    n_rows, m, stride_a, stride_m,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    # a whole-row tile masks by row only, which keeps rows contiguous for vector loads and stores
    mask = row_ok[:, None] if BLOCK_D == D else row_ok[:, None] & (cols < D)[None, :]
    s = tl.load(scale_ptr + rows, mask=row_ok)  # (BLOCK_R,) fp32
    d = tl.load(data_ptr + rows[:, None] * D + cols[None, :], mask=mask)  # (BLOCK_R, BLOCK_D)
    y = d.to(tl.float32) * s[:, None]
    dst = out_ptr + _row_offsets(rows, m, stride_a, stride_m)[:, None] + cols[None, :]
    tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_flat_kernel(
    data_ptr, scale_ptr, out_ptr,
    n_elements, m, stride_a, stride_m,
    D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    rows = offs // D
    s = tl.load(scale_ptr + rows, mask=mask)
    d = tl.load(data_ptr + offs, mask=mask)
    y = d.to(tl.float32) * s
    dst = out_ptr + _row_offsets(rows, m, stride_a, stride_m) + (offs - rows * D)
    tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "m", "per"])  # one build whatever the number of states encoded
def _encode_kernel(
    x_ptr, data_ptr, scale_ptr,
    n_rows, m, stride_a, stride_m, limit, per, data_stride, scale_stride,
    D: tl.constexpr, TOP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    item = rows // per  # the state (cache block) a row belongs to, `per` rows each
    at = (rows - item * per).to(tl.int64)
    data_rows = item.to(tl.int64) * data_stride + at * D
    scale_rows = item.to(tl.int64) * scale_stride + at
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    # a whole-row tile masks by row only, which keeps rows contiguous for vector loads and stores
    mask = row_ok[:, None] if BLOCK_D == D else row_ok[:, None] & (cols < D)[None, :]
    src = x_ptr + _row_offsets(rows, m, stride_a, stride_m)[:, None] + cols[None, :]
    x = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_D), exact widening
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)  # (BLOCK_R,) bits of max |x|
    e = tl.maximum(_frexp_exponent(amax_bits), TOP - 149)
    tl.store(scale_ptr + scale_rows, _pow2(e - TOP), mask=row_ok)
    k = TOP - e  # x / 2**(e - top) == x * 2**k; 2**k leaves the fp32 range above 127
    big = k > 126
    first = _pow2(tl.where(big, 64, 0))
    second = _pow2(tl.where(big, k - 64, k))
    y = (x * first[:, None]) * second[:, None]
    y = tl.minimum(tl.maximum(y, -limit), limit)
    tl.store(data_ptr + data_rows[:, None] + cols[None, :], y.to(data_ptr.dtype.element_ty), mask=mask)


def _leading(t: Tensor) -> tuple[int, int, int, int] | None:
    """`(A, M, stride_a, stride_m)` such that row r of `t: (..., D)` starts at element offset
    `(r // M) * stride_a + (r % M) * stride_m`, or None if the leading dims do not collapse to two."""
    if t.dim() < 1 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return None
    dims: list[tuple[int, int]] = []  # (size, stride), outermost first
    for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) > 2:
        return None
    while len(dims) < 2:
        dims.insert(0, (1, 0))
    (a, stride_a), (m, stride_m) = dims
    return a, m, stride_a, stride_m


def _disjoint_rows(lead: tuple[int, int, int, int], d: int) -> bool:
    """The rows of a collapsed (A, M, D) view never overlap (safe to write)."""
    a, m, stride_a, stride_m = lead
    return (m == 1 or stride_m >= d) and (a == 1 or stride_a >= (m - 1) * stride_m + d)


def _fits(data: Tensor, scale: Tensor, t: Tensor) -> bool:
    """Common checks: devices, the encoded dtypes and contiguity, shapes, sizes."""
    return _typed(data, scale, t) and data.is_contiguous() and scale.is_contiguous()


def _typed(data: Tensor, scale: Tensor, t: Tensor) -> bool:
    """Devices, the encoded dtypes, shapes, sizes."""
    if not (data.is_cuda and data.device == scale.device == t.device):
        return False
    if data.dtype not in _STORAGE or scale.dtype != torch.float32 or t.dtype not in _OUT:
        return False
    if data.dtype == torch.float8_e4m3fn and not _has_fp8(data.device.index):
        return False
    if data.shape != t.shape or scale.shape != t.shape[:-1] or t.dim() < 1:
        return False
    return data.numel() <= _MAX_ELEMENTS


def _stacked(data: Tensor, scale: Tensor) -> tuple[int, int, int] | None:
    """`(per, data_stride, scale_stride)`: the encoded rows as items of `per` rows, item i's data and scales
    contiguous at i * data_stride and i * scale_stride elements (stacked states written straight into cache
    blocks: `BlockLayout.rows_views`); None if the outputs are laid out otherwise or overlap."""
    rows = scale.numel()
    if data.is_contiguous() and scale.is_contiguous():
        return rows, 0, 0
    if data.dim() < 2 or not (data[0].is_contiguous() and scale[0].is_contiguous()):
        return None
    per = rows // data.shape[0] if data.shape[0] else 0
    if data.shape[0] > 1 and (data.stride(0) < per * data.shape[-1] or scale.stride(0) < per):
        return None
    return per, data.stride(0), scale.stride(0)


@functools.cache
def _has_fp8(index: int | None) -> bool:
    """Triton's fp8e4nv (hardware e4m3 conversions) needs sm_89 or newer."""
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _rows_block(d: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    return max(1, TILE // block_d), block_d


def decode(data: Tensor, scale: Tensor, out: Tensor) -> bool:
    """`data (..., D)` fp8/fp16/bf16 contiguous, `scale (...)` fp32 contiguous -> `out (..., D)` fp32/fp16/
    bf16, possibly a strided view (see the module doc). One launch on the current stream; False if unhandled."""
    if not _fits(data, scale, out):
        return False
    lead = _leading(out)
    d = out.shape[-1]
    if lead is None or not _disjoint_rows(lead, d):
        return False
    if out.numel() == 0:
        return True
    _, m, stride_a, stride_m = lead
    with torch.cuda.device(out.device):
        if d < FLAT_BELOW:
            grid = (triton.cdiv(data.numel(), TILE),)
            _decode_flat_kernel[grid](
                data, scale, out, data.numel(), m, stride_a, stride_m, D=d, BLOCK=TILE, num_warps=4
            )
        else:
            block_r, block_d = _rows_block(d)
            rows = scale.numel()
            _decode_rows_kernel[(triton.cdiv(rows, block_r),)](
                data, scale, out, rows, m, stride_a, stride_m,
                D=d, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
            )  # fmt: skip
    return True


def encode(x: Tensor, data: Tensor, scale: Tensor, top: int, limit: float) -> bool:
    """`x (..., D)` fp32/fp16/bf16, possibly a strided view -> `data (..., D)` (fp8/fp16/bf16) and `scale (...)`
    fp32, both contiguous, or stacked: `(n, ...)` whose every `[i]` is contiguous (n states into n cache
    blocks, `_stacked`). One launch on the current stream; False if unhandled."""
    if not _typed(data, scale, x):
        return False
    lead, out = _leading(x), _stacked(data, scale)
    if lead is None or out is None:
        return False
    if x.numel() == 0:
        return True
    _, m, stride_a, stride_m = lead
    per, data_stride, scale_stride = out
    block_r, block_d = _rows_block(x.shape[-1])
    rows = scale.numel()
    with torch.cuda.device(x.device):
        _encode_kernel[(triton.cdiv(rows, block_r),)](
            x, data, scale, rows, m, stride_a, stride_m, float(limit), per, data_stride, scale_stride,
            D=x.shape[-1], TOP=top, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return True
